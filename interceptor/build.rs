//! Builds the eBPF object from `interceptor-ebpf` with the nightly toolchain
//! and bpf-linker (see `cargo xtask setup`), into `OUT_DIR/interceptor-ebpf`.
fn main() -> anyhow::Result<()> {
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
