//! x86_64 boot: loading a kernel (ELF `vmlinux`, `bzImage` or the built-in
//! test guest) and initrd, writing boot_params with the e820 map and the
//! command line, and putting each vCPU in 64-bit long mode at the entry point
//! (GDT, identity page tables, CPUID, MSRs, FPU, LAPIC LINT0/LINT1).

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::memory::{self, GAP_START};

/// Where boot_params ("zero page") lives.
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Where the command line lives.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line accepted.
pub const CMDLINE_MAX: usize = 4096;
/// Start of the EBDA, where the MP table goes; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Where kernels are loaded at the lowest.
pub const HIMEM_START: u64 = 0x100000;
const GDT_ADDR: u64 = 0x500;
const IDT_ADDR: u64 = 0x520;
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
const E820_RAM: u32 = 1;

/// Errors while loading a kernel or setting up a vCPU for boot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel file can't be opened or read.
    #[error("cannot read kernel {path}")]
    KernelFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Neither an ELF nor a bzImage.
    #[error("{0} is not a kernel stasis can boot: not an x86_64 ELF vmlinux nor a bzImage")]
    NotAKernel(PathBuf),
    /// The loader rejected the image.
    #[error("cannot load kernel {path}: {source}")]
    Load {
        /// The file.
        path: PathBuf,
        /// Why.
        source: linux_loader::loader::Error,
    },
    /// The initrd can't be read.
    #[error("cannot read initrd {path}")]
    InitrdFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initrd doesn't fit in low memory above the kernel.
    #[error(
        "initrd of {size} bytes does not fit in guest memory below {limit:#x} above the kernel"
    )]
    InitrdTooBig {
        /// Its size.
        size: u64,
        /// Top of usable low memory.
        limit: u64,
    },
    /// The command line is too long or has a NUL byte.
    #[error("kernel command line is invalid: longer than {CMDLINE_MAX} bytes or contains NUL")]
    Cmdline,
    /// Writing boot structures into guest memory failed.
    #[error("cannot write boot data to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    /// A KVM vCPU setup ioctl failed.
    #[error("KVM refused {what}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kernel {
    /// The built-in ring-3 test guest.
    TestGuest,
    /// A kernel image on disk: ELF vmlinux or bzImage.
    Path(PathBuf),
}

/// Result of loading: where vCPU 0 starts.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// 64-bit entry point.
    pub entry: u64,
}

fn load_image<F: Read + Seek + vm_memory::ReadVolatile>(
    mem: &GuestMemoryMmap,
    image: &mut F,
    path: &Path,
) -> Result<(KernelLoaderResult, bool), Error> {
    let mut magic = [0u8; 4];
    let is_elf = image.read_exact(&mut magic).is_ok() && &magic == b"\x7fELF";
    let load_err = |source| Error::Load {
        path: path.to_owned(),
        source,
    };
    if is_elf {
        Elf::load(mem, None, image, Some(GuestAddress(HIMEM_START)))
            .map(|r| (r, false))
            .map_err(load_err)
    } else {
        // A bzImage has "HdrS" at 0x202.
        let mut hdr = [0u8; 4];
        let ok = image.seek(SeekFrom::Start(0x202)).is_ok() && image.read_exact(&mut hdr).is_ok();
        if !ok || &hdr != b"HdrS" {
            return Err(Error::NotAKernel(path.to_owned()));
        }
        BzImage::load(mem, None, image, Some(GuestAddress(HIMEM_START)))
            .map(|r| (r, true))
            .map_err(load_err)
    }
}

/// Loads the kernel and initrd, writes the command line and boot_params.
pub fn load(
    mem: &GuestMemoryMmap,
    kernel: &Kernel,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<Loaded, Error> {
    let (res, bz) = match kernel {
        Kernel::TestGuest => load_image(
            mem,
            &mut Cursor::new(crate::guest::IMAGE),
            Path::new("<built-in test guest>"),
        )?,
        Kernel::Path(p) => {
            let mut f = File::open(p).map_err(|source| Error::KernelFile {
                path: p.clone(),
                source,
            })?;
            load_image(mem, &mut f, p)?
        }
    };
    let mut params = boot_params::default();
    if let Some(hdr) = res.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448;
    params.hdr.kernel_alignment = 0x0100_0000;

    if cmdline.len() > CMDLINE_MAX || cmdline.contains('\0') {
        return Err(Error::Cmdline);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(Error::GuestMemory)?;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = bytes.len() as u32;

    let low_end = mem.last_addr().raw_value().min(GAP_START - 1) + 1;
    if let Some(path) = initrd {
        let data = std::fs::read(path).map_err(|source| Error::InitrdFile {
            path: path.to_owned(),
            source,
        })?;
        let size = data.len() as u64;
        let kernel_end = res.kernel_load.raw_value() + res.kernel_end;
        let addr = low_end
            .checked_sub(size)
            .map(|a| a & !(memory::PAGE_SIZE - 1))
            .filter(|a| *a >= kernel_end.max(HIMEM_START))
            .ok_or(Error::InitrdTooBig {
                size,
                limit: low_end,
            })?;
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(Error::GuestMemory)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let mut e820 = vec![(0, EBDA_START)];
    for region in mem.iter() {
        use vm_memory::GuestMemoryRegion;
        let (start, len) = (region.start_addr().raw_value(), region.len());
        if start == 0 {
            if len > HIMEM_START {
                e820.push((HIMEM_START, len - HIMEM_START));
            }
        } else {
            e820.push((start, len));
        }
    }
    for (i, (addr, size)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(Error::GuestMemory)?;

    // The 64-bit entry of a bzImage is 0x200 past the protected-mode code.
    let entry = if bz {
        res.kernel_load.raw_value() + 0x200
    } else {
        res.kernel_load.raw_value()
    };
    write_gdt_and_page_tables(mem)?;
    Ok(Loaded { entry })
}

/// GDT entries: null, 64-bit code, data, TSS.
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn segment(index: u16) -> kvm_segment {
    let e = GDT[index as usize];
    let g = ((e >> 55) & 1) as u8;
    let raw_limit = (((e >> 32) & 0xf_0000) | (e & 0xffff)) as u32;
    kvm_segment {
        base: ((e >> 16) & 0xff_ffff) | ((e >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: if (e >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

fn write_gdt_and_page_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(Error::GuestMemory)
    };
    for (i, e) in GDT.iter().enumerate() {
        w(*e, GDT_ADDR + 8 * i as u64)?;
    }
    w(0, IDT_ADDR)?;
    // Identity-map the first GiB with 2 MiB pages.
    w(PDPT_ADDR | 3, PML4_ADDR)?;
    w(PD_ADDR | 3, PDPT_ADDR)?;
    for i in 0..512u64 {
        w((i << 21) | 0x83, PD_ADDR + i * 8)?;
    }
    Ok(())
}

/// CPUID for vCPU `id` of `count`: the host's supported set with the APIC
/// id, topology and hypervisor bit fixed up, and TSC-deadline mode
/// announced when KVM emulates it (KVM_GET_SUPPORTED_CPUID leaves that bit
/// clear; without it Linux's LAPIC timer calibration fails).
pub fn cpuid(kvm: &Kvm, id: u8, count: u8) -> Result<CpuId, Error> {
    let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((id as u32) << 24) | ((count as u32) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
                if tsc_deadline {
                    e.ecx |= 1 << 24; // TSC-deadline LAPIC timer
                }
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: several logical processors
                }
            }
            0xb | 0x1f => e.edx = id as u32,
            _ => {}
        }
    }
    Ok(cpuid)
}

/// Puts a vCPU in its power-on state for a 64-bit boot: only vCPU 0 gets
/// registers; the others wait for INIT/SIPI from the guest.
pub fn setup_vcpu(kvm: &Kvm, vcpu: &VcpuFd, id: u8, count: u8, entry: u64) -> Result<(), Error> {
    vcpu.set_cpuid2(&cpuid(kvm, id, count)?)
        .map_err(kvm_err("KVM_SET_CPUID2"))?;
    let msrs = Msrs::from_entries(&boot_msrs()).map_err(|_| Error::Kvm {
        what: "boot MSR list",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
    setup_lapic(vcpu)?;
    if id != 0 {
        return Ok(());
    }
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let code = segment(1);
    let data = segment(2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= 0x20; // PAE
    sregs.cr0 |= 0x8000_0001; // PG | PE
    sregs.efer |= 0x500; // LME | LMA
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rflags: 2,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
}

fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(0x174, 0),             // SYSENTER_CS
        e(0x175, 0),             // SYSENTER_ESP
        e(0x176, 0),             // SYSENTER_EIP
        e(0xc000_0081, 0),       // STAR
        e(0xc000_0082, 0),       // LSTAR
        e(0xc000_0083, 0),       // CSTAR
        e(0xc000_0084, 0),       // SYSCALL_MASK
        e(0xc000_0102, 0),       // KERNEL_GS_BASE
        e(0x10, 0),              // TSC
        e(0x1a0, 1),             // MISC_ENABLE: fast strings
        e(0x2ff, (1 << 11) | 6), // MTRR default type: enabled, write-back
    ]
}

fn setup_lapic(vcpu: &VcpuFd) -> Result<(), Error> {
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let mut set = |off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    };
    set(0x350, 7); // LINT0: ExtINT
    set(0x360, 4); // LINT1: NMI
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let c = segment(1);
        assert_eq!(
            (c.l, c.db, c.type_, c.present, c.limit),
            (1, 0, 0xb, 1, 0xffff_ffff)
        );
        let d = segment(2);
        assert_eq!((d.db, d.type_, d.selector), (1, 3, 16));
    }

    #[test]
    fn rejects_non_kernels() {
        let mem = memory::create(64 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("junk");
        std::fs::write(&p, vec![0x42u8; 4096]).unwrap();
        let err = load(&mem, &Kernel::Path(p), None, "").unwrap_err();
        assert!(err.to_string().contains("not a kernel"), "{err}");
        let err = load(&mem, &Kernel::Path(dir.path().join("missing")), None, "").unwrap_err();
        assert!(err.to_string().contains("cannot read kernel"), "{err}");
    }

    #[test]
    fn loads_the_test_guest_with_an_e820_map() {
        let mem = memory::create(64 << 20).unwrap();
        let l = load(&mem, &Kernel::TestGuest, None, "stasis.mib=1").unwrap();
        assert_eq!(l.entry, HIMEM_START);
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
        assert_eq!(p.e820_entries, 2);
        assert_eq!({ p.e820_table[1].size }, (64 << 20) - HIMEM_START);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
    }
}
