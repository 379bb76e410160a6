//! Builds the eBPF object from `interceptor-ebpf` with the nightly toolchain
//! and bpf-linker (see `cargo xtask setup`), into `OUT_DIR/interceptor-ebpf`.
//! Fuzzing builds (`cargo xtask fuzz`, `--cfg fuzzing`) never load the
//! programs and carry sanitizer flags the BPF target cannot take: they get
//! an empty object instead.
fn main() -> anyhow::Result<()> {
    println!("cargo::rustc-check-cfg=cfg(fuzzing)");
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
        std::fs::write(out.join("interceptor-ebpf"), [])?;
        return Ok(());
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../interceptor-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "interceptor-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
