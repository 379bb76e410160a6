//! What the unix-socket programs need and aya 0.14 does not offer: the
//! kernel's BTF read for function ids and member offsets, a small eBPF
//! instruction builder, and the `bpf(2)` commands that load, attach and pin
//! programs and maps of types aya cannot attach (`cgroup/connect_unix`,
//! `fmod_ret`).
//!
//! Offsets of kernel structures are never assumed: each is read from the
//! running kernel's BTF (`/sys/kernel/btf/vmlinux`), and a missing one is an
//! error that names it.

use std::{
    collections::HashMap,
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

/// Why a BTF lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("kernel BTF ({0}): {1}")]
    Read(&'static str, io::Error),
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no {0}")]
    Missing(String),
}

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_FUNC: u32 = 12;

/// One type of the kernel's BTF: its kind, name, the type it refers to
/// (typedefs and modifiers) and, for a struct or union, its members (name,
/// type id, bit offset).
struct Type {
    kind: u32,
    name: u32,
    refers: u32,
    members: Vec<(u32, u32, u32)>,
}

/// The running kernel's BTF, as far as the unix programs need it.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    by_name: HashMap<(u32, String), u32>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_ne_bytes(s.try_into().expect("4 bytes")))
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    pub fn from_kernel() -> Result<Btf, BtfError> {
        let data = std::fs::read(VMLINUX).map_err(|e| BtfError::Read(VMLINUX, e))?;
        Btf::parse(&data)
    }

    fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        if data.get(..2) != Some(&0xeb9fu16.to_ne_bytes()) {
            return Err(BtfError::Malformed("bad magic"));
        }
        let hdr = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let section = |off: usize, len: usize| {
            data.get(hdr + off..hdr + off + len)
                .ok_or(BtfError::Malformed("section out of bounds"))
        };
        let raw = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?.to_vec();
        // Type id 0 is void.
        let mut types = vec![Type {
            kind: 0,
            name: 0,
            refers: 0,
            members: Vec::new(),
        }];
        let mut at = 0;
        while at < raw.len() {
            let name = u32_at(raw, at)?;
            let info = u32_at(raw, at + 4)?;
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let bitfields = info >> 31 == 1;
            let refers = u32_at(raw, at + 8)?;
            at += 12;
            let mut members = Vec::new();
            let extra = match kind {
                1 | 14 | 17 => 4, // int, var, decl_tag
                3 => 12,          // array
                4 | 5 => {
                    for m in 0..vlen {
                        let p = at + m * 12;
                        let off = u32_at(raw, p + 8)?;
                        let bits = if bitfields { off & 0xff_ffff } else { off };
                        members.push((u32_at(raw, p)?, u32_at(raw, p + 4)?, bits));
                    }
                    vlen * 12
                }
                6 | 13 => vlen * 8,        // enum, func_proto
                15 | 19 => vlen * 12,      // datasec, enum64
                2 | 7..=12 | 16 | 18 => 0, // ptr, fwd, typedef, modifiers, func, float, type_tag
                _ => return Err(BtfError::Malformed("unknown kind")),
            };
            at += extra;
            types.push(Type {
                kind,
                name,
                refers,
                members,
            });
        }
        let mut btf = Btf {
            types,
            strings,
            by_name: HashMap::new(),
        };
        for id in 1..btf.types.len() {
            let t = &btf.types[id];
            if matches!(t.kind, KIND_STRUCT | KIND_UNION | KIND_FUNC) && t.name != 0 {
                let key = (t.kind, btf.name(t.name).to_owned());
                btf.by_name.entry(key).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or_default()
    }

    /// The id of kernel function (or kfunc) `name`.
    pub fn func(&self, name: &str) -> Result<u32, BtfError> {
        self.by_name
            .get(&(KIND_FUNC, name.to_owned()))
            .copied()
            .ok_or_else(|| BtfError::Missing(format!("function {name}")))
    }

    /// Byte offset of `path` (members, outermost first) within struct
    /// `outer`, looking through anonymous members; each step but the last
    /// must itself be an embedded struct or union.
    pub fn offset(&self, outer: &str, path: &[&str]) -> Result<usize, BtfError> {
        let missing = || BtfError::Missing(format!("{outer}.{}", path.join(".")));
        let mut id = *self
            .by_name
            .get(&(KIND_STRUCT, outer.to_owned()))
            .ok_or_else(missing)?;
        let mut bits = 0;
        for member in path {
            let (at, ty) = self.member(id, member).ok_or_else(missing)?;
            bits += at;
            id = self.resolved(ty);
        }
        if bits % 8 != 0 {
            return Err(missing());
        }
        Ok(bits as usize / 8)
    }

    /// Bit offset and type of member `name` of the struct or union `id`,
    /// found directly or inside an anonymous member.
    fn member(&self, id: u32, name: &str) -> Option<(u32, u32)> {
        let t = self.types.get(id as usize)?;
        for &(n, ty, bits) in &t.members {
            if n != 0 && self.name(n) == name {
                return Some((bits, ty));
            }
            if n == 0 {
                let inner = self.resolved(ty);
                if let Some((b, ty)) = self.member(inner, name) {
                    return Some((bits + b, ty));
                }
            }
        }
        None
    }

    /// `id` with typedefs and modifiers looked through.
    fn resolved(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(t) if matches!(t.kind, 8..=11 | 18) => id = t.refers,
                _ => break,
            }
        }
        id
    }
}

// ---------------------------------------------------------------------------
// Instructions

/// An eBPF instruction.
#[derive(Clone, Copy, Debug)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            regs: (src << 4) | dst,
            off,
            imm,
        }
    }
    fn encode(self) -> u64 {
        let b = [
            self.code,
            self.regs,
            self.off.to_le_bytes()[0],
            self.off.to_le_bytes()[1],
        ];
        u64::from(u32::from_le_bytes(b)) | (u64::from(self.imm as u32) << 32)
    }
}

/// Registers.
pub const R0: u8 = 0;
pub const R1: u8 = 1;
pub const R2: u8 = 2;
pub const R3: u8 = 3;
pub const R4: u8 = 4;
pub const R6: u8 = 6;
pub const R7: u8 = 7;
pub const R8: u8 = 8;
pub const R9: u8 = 9;
pub const FP: u8 = 10;

/// Sizes of loads and stores.
#[derive(Clone, Copy)]
pub enum Size {
    W = 0x00,
    DW = 0x18,
}

/// Conditions of jumps (compared as unsigned unless said).
#[derive(Clone, Copy)]
pub enum Cond {
    Eq = 0x10,
    Gt = 0x20,
    Ne = 0x50,
    Sle = 0xd0,
}

/// Helpers called by number.
pub const MAP_LOOKUP: i32 = 1;
pub const MAP_UPDATE: i32 = 2;
pub const MAP_DELETE: i32 = 3;
pub const GET_SOCKET_COOKIE: i32 = 46;
pub const PROBE_READ_KERNEL: i32 = 113;
pub const PROBE_READ_KERNEL_STR: i32 = 115;

const BPF_LD: u8 = 0x00;
const BPF_LDX: u8 = 0x01;
const BPF_ST: u8 = 0x02;
const BPF_STX: u8 = 0x03;
const BPF_JMP: u8 = 0x05;
const BPF_ALU64: u8 = 0x07;
const BPF_K: u8 = 0x00;
const BPF_X: u8 = 0x08;
const BPF_MEM: u8 = 0x60;
const BPF_IMM: u8 = 0x00;

/// A program being written: instructions, and jumps to labels resolved by
/// [`Asm::finish`].
#[derive(Default)]
pub struct Asm {
    insns: Vec<Insn>,
    labels: HashMap<&'static str, usize>,
    jumps: Vec<(usize, &'static str)>,
}

impl Asm {
    fn push(&mut self, i: Insn) -> &mut Self {
        self.insns.push(i);
        self
    }
    pub fn mov(&mut self, dst: u8, src: u8) -> &mut Self {
        self.push(Insn::new(BPF_ALU64 | 0xb0 | BPF_X, dst, src, 0, 0))
    }
    pub fn mov_imm(&mut self, dst: u8, imm: i32) -> &mut Self {
        self.push(Insn::new(BPF_ALU64 | 0xb0 | BPF_K, dst, 0, 0, imm))
    }
    pub fn add_imm(&mut self, dst: u8, imm: i32) -> &mut Self {
        self.push(Insn::new(BPF_ALU64 | BPF_K, dst, 0, 0, imm))
    }
    /// `dst = *(size *)(src + off)`
    pub fn load(&mut self, size: Size, dst: u8, src: u8, off: i16) -> &mut Self {
        self.push(Insn::new(BPF_LDX | BPF_MEM | size as u8, dst, src, off, 0))
    }
    /// `*(size *)(dst + off) = src`
    pub fn store(&mut self, size: Size, dst: u8, off: i16, src: u8) -> &mut Self {
        self.push(Insn::new(BPF_STX | BPF_MEM | size as u8, dst, src, off, 0))
    }
    /// `*(size *)(dst + off) = imm`
    pub fn store_imm(&mut self, size: Size, dst: u8, off: i16, imm: i32) -> &mut Self {
        self.push(Insn::new(BPF_ST | BPF_MEM | size as u8, dst, 0, off, imm))
    }
    /// `dst = &map` (by file descriptor).
    pub fn map(&mut self, dst: u8, map: &OwnedFd) -> &mut Self {
        self.push(Insn::new(
            BPF_LD | BPF_IMM | Size::DW as u8,
            dst,
            1,
            0,
            map.as_raw_fd(),
        ))
        .push(Insn::new(0, 0, 0, 0, 0))
    }
    pub fn call(&mut self, helper: i32) -> &mut Self {
        self.push(Insn::new(BPF_JMP | 0x80, 0, 0, 0, helper))
    }
    /// Calls the kernel function whose vmlinux BTF id is `id`.
    pub fn kfunc(&mut self, id: u32) -> &mut Self {
        self.push(Insn::new(BPF_JMP | 0x80, 0, 2, 0, id as i32))
    }
    /// Jumps to `label` when `dst cond imm`.
    pub fn jump_if(&mut self, cond: Cond, dst: u8, imm: i32, label: &'static str) -> &mut Self {
        self.jumps.push((self.insns.len(), label));
        self.push(Insn::new(BPF_JMP | cond as u8 | BPF_K, dst, 0, 0, imm))
    }
    pub fn label(&mut self, name: &'static str) -> &mut Self {
        self.labels.insert(name, self.insns.len());
        self
    }
    pub fn exit(&mut self) -> &mut Self {
        self.push(Insn::new(BPF_JMP | 0x90, 0, 0, 0, 0))
    }
    /// The encoded program.
    pub fn finish(mut self) -> Vec<u64> {
        for (at, label) in std::mem::take(&mut self.jumps) {
            let to = self.labels[label];
            self.insns[at].off = (to as isize - at as isize - 1) as i16;
        }
        self.insns.into_iter().map(Insn::encode).collect()
    }
}

// ---------------------------------------------------------------------------
// bpf(2)

pub const MAP_HASH: u32 = 1;
pub const MAP_LRU_HASH: u32 = 9;
pub const PROG_CGROUP_SOCK_ADDR: u32 = 18;
pub const PROG_TRACING: u32 = 26;
pub const PROG_LSM: u32 = 29;
pub const ATTACH_MODIFY_RETURN: u32 = 26;
pub const ATTACH_LSM_MAC: u32 = 27;
pub const ATTACH_CGROUP_UNIX_CONNECT: u32 = 49;

const MAP_CREATE: u32 = 0;
const MAP_UPDATE_ELEM: u32 = 2;
const MAP_DELETE_ELEM: u32 = 3;
const MAP_GET_NEXT_KEY: u32 = 4;
const PROG_LOAD: u32 = 5;
const OBJ_PIN: u32 = 6;
const OBJ_GET: u32 = 7;
const LINK_CREATE: u32 = 28;

/// A `union bpf_attr`, filled by byte offset (the layout of each command
/// is fixed by the kernel's ABI).
struct Attr([u64; 18]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 18])
    }
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: a [u64; 18] is 144 initialised bytes, viewed as bytes for
        // as long as `self` is borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), 144) }
    }
    fn u32(mut self, at: usize, v: u32) -> Attr {
        self.bytes()[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, at: usize, v: u64) -> Attr {
        self.bytes()[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn ptr<T>(self, at: usize, p: *const T) -> Attr {
        self.u64(at, p as u64)
    }
    fn call(&mut self, cmd: u32) -> io::Result<i64> {
        // SAFETY: bpf(2) with an attribute block of the size it is told;
        // every pointer in it refers to memory the caller keeps alive
        // across this call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd as libc::c_long,
                self.0.as_mut_ptr(),
                std::mem::size_of_val(&self.0),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }
    fn fd(mut self, cmd: u32) -> io::Result<OwnedFd> {
        let fd = self.call(cmd)? as RawFd;
        // SAFETY: the kernel just returned this new descriptor to us.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with a NUL byte"))
}

/// Creates a map; `name` (at most 15 bytes) shows in `bpftool map`.
pub fn map_create(
    kind: u32,
    key: u32,
    value: u32,
    entries: u32,
    name: &str,
) -> io::Result<OwnedFd> {
    let mut attr = Attr::new()
        .u32(0, kind)
        .u32(4, key)
        .u32(8, value)
        .u32(12, entries);
    let n = name.len().min(15);
    attr.bytes()[28..28 + n].copy_from_slice(&name.as_bytes()[..n]);
    attr.fd(MAP_CREATE)
}

pub fn map_update(map: &OwnedFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    Attr::new()
        .u32(0, map.as_raw_fd() as u32)
        .ptr(8, key.as_ptr())
        .ptr(16, value.as_ptr())
        .call(MAP_UPDATE_ELEM)
        .map(drop)
}

pub fn map_delete(map: &OwnedFd, key: &[u8]) -> io::Result<()> {
    Attr::new()
        .u32(0, map.as_raw_fd() as u32)
        .ptr(8, key.as_ptr())
        .call(MAP_DELETE_ELEM)
        .map(drop)
}

/// Every key of a map of `key_size`-byte keys.
pub fn map_keys(map: &OwnedFd, key_size: usize) -> io::Result<Vec<Vec<u8>>> {
    let mut keys: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut next = vec![0u8; key_size];
        let mut attr = Attr::new().u32(0, map.as_raw_fd() as u32);
        if let Some(last) = keys.last() {
            attr = attr.ptr(8, last.as_ptr());
        }
        match attr.ptr(16, next.as_mut_ptr()).call(MAP_GET_NEXT_KEY) {
            Ok(_) => keys.push(next),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
            Err(e) => return Err(e),
        }
    }
}

/// What a program is loaded as.
pub struct ProgSpec<'a> {
    pub kind: u32,
    pub attach: u32,
    /// For tracing programs: the vmlinux BTF id of the function.
    pub attach_btf_id: u32,
    pub name: &'a str,
}

/// Loads a GPL program; a refusal carries the verifier's log.
pub fn prog_load(spec: &ProgSpec<'_>, insns: &[u64]) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let attempt = |log: &mut [u8]| {
        let mut attr = Attr::new()
            .u32(0, spec.kind)
            .u32(4, insns.len() as u32)
            .ptr(8, insns.as_ptr())
            .ptr(16, license.as_ptr())
            .u32(68, spec.attach)
            .u32(108, spec.attach_btf_id);
        if !log.is_empty() {
            attr = attr
                .u32(24, 1)
                .u32(28, log.len() as u32)
                .ptr(32, log.as_mut_ptr());
        }
        let n = spec.name.len().min(15);
        attr.bytes()[48..48 + n].copy_from_slice(&spec.name.as_bytes()[..n]);
        attr.fd(PROG_LOAD)
    };
    attempt(&mut []).or_else(|e| {
        let mut log = vec![0u8; 1 << 16];
        match attempt(&mut log) {
            Ok(fd) => Ok(fd),
            Err(_) => {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                let text = String::from_utf8_lossy(&log[..end]);
                let tail: Vec<&str> = text.lines().rev().take(6).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                Err(io::Error::new(
                    e.kind(),
                    format!("{e}; verifier: {}", tail.join(" | ")),
                ))
            }
        }
    })
}

/// Attaches a program: to a cgroup (`target` its directory's descriptor)
/// or, for a tracing program, to its function (`target` `None`).
pub fn link_create(prog: &OwnedFd, target: Option<RawFd>, attach: u32) -> io::Result<OwnedFd> {
    Attr::new()
        .u32(0, prog.as_raw_fd() as u32)
        .u32(4, target.unwrap_or(0) as u32)
        .u32(8, attach)
        .fd(LINK_CREATE)
}

/// Pins a map, program or link at `path` in bpffs.
pub fn obj_pin(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    let p = c_path(path)?;
    Attr::new()
        .ptr(0, p.as_ptr())
        .u32(8, fd.as_raw_fd() as u32)
        .call(OBJ_PIN)
        .map(drop)
}

/// Opens what is pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let p = c_path(path)?;
    Attr::new().ptr(0, p.as_ptr()).fd(OBJ_GET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_are_relative_to_the_next_instruction() {
        let mut a = Asm::default();
        a.jump_if(Cond::Eq, R0, 0, "out")
            .mov_imm(R0, 1)
            .label("out")
            .exit();
        let code = a.finish();
        assert_eq!(code.len(), 3);
        // off is bytes 2..4 of the first instruction.
        assert_eq!((code[0] >> 16) as i16, 1);
        assert_eq!(code[0] & 0xff, 0x15);
        assert_eq!(code[1] >> 32, 1);
        assert_eq!(code[2] & 0xff, 0x95);
    }

    /// The kernel's own BTF has what the unix programs use (this machine
    /// runs a kernel with it; a kernel without BTF fails the agent's start
    /// with the same message).
    #[test]
    fn kernel_btf_names_what_the_unix_programs_use() {
        let btf = Btf::from_kernel().unwrap();
        assert_eq!(btf.offset("bpf_sock_addr_kern", &["uaddr"]).unwrap(), 8);
        assert_eq!(btf.offset("bpf_sock_addr_kern", &["uaddrlen"]).unwrap(), 32);
        assert_eq!(btf.offset("unix_sock", &["sk"]).unwrap(), 0);
        assert!(btf.offset("sock", &["__sk_common", "skc_cookie"]).unwrap() > 0);
        assert!(btf.func("bpf_sock_addr_set_sun_path").unwrap() > 0);
        assert!(btf.func("security_unix_stream_connect").unwrap() > 0);
        assert!(btf.func("bpf_lsm_unix_stream_connect").unwrap() > 0);
        assert!(btf.offset("sock", &["no_such_member"]).is_err());
    }
}
