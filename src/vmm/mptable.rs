//! The Intel MultiProcessor Specification (v1.4) table: how a guest without
//! ACPI learns its processors and interrupt wiring.
//!
//! Linux looks for the 16-byte MP floating pointer ("_MP_") in the first
//! kilobyte of the EBDA, among other places; it points at the configuration
//! table ("PCMP"), whose entries list one processor per vCPU (APIC id = vCPU
//! index, vCPU 0 the bootstrap processor), the ISA bus, the in-kernel IOAPIC,
//! the 16 ISA interrupts and the local APIC's LINT0/LINT1 wiring. Without the
//! table Linux sees a single CPU.
//!
//! The wiring matches the VM `super` creates: KVM's in-kernel PIC + IOAPIC
//! with its default routing, where ISA IRQ n reaches IOAPIC pin n (so IRQ 0,
//! the PIT, is pin 0 too), and every LAPIC has LINT0 in ExtINT and LINT1 in
//! NMI mode (`boot::setup_vcpu`).
//!
//! Both structures sit in the EBDA's kilobyte (`boot::EBDA_START`, reserved
//! in the e820 map), below the legacy VGA window. They are built as
//! little-endian bytes, field by field, so no `unsafe` is needed.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::EBDA_START;

/// Where the floating pointer goes; the configuration table follows it.
pub const START: u64 = EBDA_START;
/// End of the space for the tables: the legacy VGA window starts here.
pub const END: u64 = 0xa_0000;

/// Local APIC registers (the KVM default).
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// IOAPIC registers (the KVM default).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const SHORT_ENTRY_LEN: usize = 8;
/// ISA IRQs described by I/O interrupt entries.
const ISA_IRQS: u8 = 16;
/// Entries besides the processors: bus, IOAPIC, ISA IRQs, LINT0, LINT1.
const OTHER_ENTRIES: usize = 1 + 1 + ISA_IRQS as usize + 2;

/// MP spec revision 1.4.
const SPEC_REV: u8 = 4;
const OEM_ID: &[u8; 8] = b"STASIS  ";
const PRODUCT_ID: &[u8; 12] = b"STASIS VMM  ";
/// Version of KVM's local APIC.
const LAPIC_VERSION: u8 = 0x14;
/// Version of KVM's IOAPIC.
const IOAPIC_VERSION: u8 = 0x11;
/// Processor signature: family 6, model 0, stepping 0.
const CPU_SIGNATURE: u32 = 6 << 8;
/// Processor feature flags (CPUID.1:EDX): FPU and on-chip APIC.
const CPU_FEATURES: u32 = 1 | (1 << 9);
const ISA_BUS_ID: u8 = 0;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const IOAPIC_ENABLED: u8 = 1;

/// Interrupt types of I/O and local interrupt entries.
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;
/// Polarity and trigger mode as the source bus defines them (ISA: edge, high).
const FLAGS_CONFORM: u16 = 0;
/// Destination of a local interrupt entry meaning every local APIC.
const ALL_LAPICS: u8 = 0xff;

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The vCPU count can't be described in the space the table has.
    #[error("cannot describe {vcpus} vCPUs in the MP table: it holds 1 to {max}")]
    BadVcpus {
        /// Asked for.
        vcpus: u8,
        /// Most that fit.
        max: u8,
    },
    /// Guest memory doesn't cover the table's place.
    #[error("cannot write the MP table to guest memory at {START:#x}")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// Bytes of the floating pointer and configuration table for `vcpus`.
pub const fn size(vcpus: u8) -> usize {
    FLOATING_LEN + HEADER_LEN + PROCESSOR_LEN * vcpus as usize + SHORT_ENTRY_LEN * OTHER_ENTRIES
}

/// Most vCPUs whose table fits between [`START`] and [`END`].
pub const fn max_vcpus() -> u8 {
    let room = (END - START) as usize - size(0);
    let n = room / PROCESSOR_LEN;
    // APIC ids are one byte, 0xff is broadcast, and the IOAPIC takes the
    // id after the last vCPU's.
    if n > 0xfe {
        0xfe
    } else {
        n as u8
    }
}

/// Writes the MP floating pointer at [`START`] and the configuration table
/// right after it, describing `vcpus` vCPUs with APIC ids `0..vcpus`.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), Error> {
    let bytes = build(vcpus)?;
    mem.write_slice(&bytes, GuestAddress(START))
        .map_err(Error::GuestMemory)
}

/// The floating pointer followed by the configuration table, as they lie in
/// guest memory from [`START`].
fn build(vcpus: u8) -> Result<Vec<u8>, Error> {
    let max = max_vcpus();
    if vcpus == 0 || vcpus > max {
        return Err(Error::BadVcpus { vcpus, max });
    }
    let table_addr = START + FLOATING_LEN as u64;
    let ioapic_id = vcpus;

    let mut entries = Vec::with_capacity(size(vcpus) - FLOATING_LEN - HEADER_LEN);
    for id in 0..vcpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(id); // local APIC id
        entries.push(LAPIC_VERSION);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]); // reserved
    }
    entries.push(ENTRY_BUS);
    entries.push(ISA_BUS_ID);
    entries.extend_from_slice(b"ISA   ");
    entries.push(ENTRY_IOAPIC);
    entries.push(ioapic_id);
    entries.push(IOAPIC_VERSION);
    entries.push(IOAPIC_ENABLED);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    for irq in 0..ISA_IRQS {
        entries.push(ENTRY_IO_INTERRUPT);
        entries.push(INT_VECTORED);
        entries.extend_from_slice(&FLAGS_CONFORM.to_le_bytes());
        entries.push(ISA_BUS_ID);
        entries.push(irq); // source bus IRQ
        entries.push(ioapic_id);
        entries.push(irq); // IOAPIC pin
    }
    // LINT0: the 8259 PIC's output (virtual wire mode), on the BSP.
    // LINT1: NMI, on every local APIC.
    for (kind, dest, lint) in [(INT_EXTINT, 0, 0), (INT_NMI, ALL_LAPICS, 1)] {
        entries.push(ENTRY_LOCAL_INTERRUPT);
        entries.push(kind);
        entries.extend_from_slice(&FLAGS_CONFORM.to_le_bytes());
        entries.push(ISA_BUS_ID);
        entries.push(0); // source bus IRQ
        entries.push(dest);
        entries.push(lint);
    }

    let table_len = HEADER_LEN + entries.len();
    let entry_count = vcpus as u16 + OTHER_ENTRIES as u16;
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, set below
    table.extend_from_slice(OEM_ID);
    table.extend_from_slice(PRODUCT_ID);
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    debug_assert_eq!(table.len(), HEADER_LEN);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_LEN + table_len);
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.push(1); // length in 16-byte paragraphs
    out.push(SPEC_REV);
    out.push(0); // checksum, set below
    out.push(0); // feature 1: a configuration table is present
    out.push(0); // feature 2: virtual wire mode, no IMCR
    out.extend_from_slice(&[0; 3]); // features 3-5, reserved
    debug_assert_eq!(out.len(), FLOATING_LEN);
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    debug_assert_eq!(out.len(), size(vcpus));
    Ok(out)
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::{memory, MAX_VCPUS};

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    /// Reads the floating pointer and the table it points at from guest memory.
    fn read_back(mem: &GuestMemoryMmap) -> (Vec<u8>, Vec<u8>) {
        let mut fp = vec![0u8; FLOATING_LEN];
        mem.read_slice(&mut fp, GuestAddress(START)).unwrap();
        let addr = u64::from(u32_at(&fp, 4));
        let mut header = vec![0u8; HEADER_LEN];
        mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
        let mut table = vec![0u8; u16_at(&header, 4) as usize];
        mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
        (fp, table)
    }

    /// Entries of a table as (type, bytes).
    fn entries(table: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut at = HEADER_LEN;
        while at < table.len() {
            let len = match table[at] {
                ENTRY_PROCESSOR => PROCESSOR_LEN,
                1..=4 => SHORT_ENTRY_LEN,
                t => panic!("unknown entry type {t} at {at}"),
            };
            out.push((table[at], &table[at..at + len]));
            at += len;
        }
        assert_eq!(at, table.len(), "entries overrun the table");
        out
    }

    #[test]
    fn checksums_sum_to_zero_and_the_pointer_points_at_the_table() {
        let mem = memory::create(64 << 20).unwrap();
        for vcpus in [1, 2, 7, MAX_VCPUS] {
            write(&mem, vcpus).unwrap();
            let (fp, table) = read_back(&mem);
            assert_eq!(&fp[..4], b"_MP_");
            assert_eq!((fp[8], fp[9], fp[11]), (1, SPEC_REV, 0));
            assert_eq!(sum(&fp), 0, "floating pointer checksum");
            assert_eq!(u64::from(u32_at(&fp, 4)), START + FLOATING_LEN as u64);
            assert_eq!(&table[..4], b"PCMP");
            assert_eq!(table[6], SPEC_REV);
            assert_eq!(sum(&table), 0, "configuration table checksum");
            assert_eq!(u32_at(&table, 36), LAPIC_ADDR);
            assert_eq!(table.len() + FLOATING_LEN, size(vcpus));
        }
    }

    #[test]
    fn entries_match_the_vcpus_and_the_interrupt_wiring() {
        let mem = memory::create(64 << 20).unwrap();
        write(&mem, 3).unwrap();
        let (_, table) = read_back(&mem);
        let e = entries(&table);
        assert_eq!(u16_at(&table, 34) as usize, e.len());
        assert_eq!(e.len(), 3 + OTHER_ENTRIES);

        let cpus: Vec<_> = e.iter().filter(|(t, _)| *t == ENTRY_PROCESSOR).collect();
        assert_eq!(cpus.len(), 3);
        for (i, (_, c)) in cpus.iter().enumerate() {
            assert_eq!(c[1] as usize, i, "APIC id");
            let bsp = if i == 0 { CPU_BSP } else { 0 };
            assert_eq!(c[3], CPU_ENABLED | bsp, "flags of CPU {i}");
        }
        let bus: Vec<_> = e.iter().filter(|(t, _)| *t == ENTRY_BUS).collect();
        assert_eq!(bus.len(), 1);
        assert_eq!(&bus[0].1[1..], b"\0ISA   ");
        let ioapic: Vec<_> = e.iter().filter(|(t, _)| *t == ENTRY_IOAPIC).collect();
        assert_eq!(ioapic.len(), 1);
        let io = ioapic[0].1;
        assert_eq!((io[1], io[2], io[3]), (3, IOAPIC_VERSION, IOAPIC_ENABLED));
        assert_eq!(u32_at(io, 4), IOAPIC_ADDR);

        let irqs: Vec<_> = e
            .iter()
            .filter(|(t, _)| *t == ENTRY_IO_INTERRUPT)
            .map(|(_, b)| (b[1], b[4], b[5], b[6], b[7]))
            .collect();
        let want: Vec<_> = (0..16).map(|i| (INT_VECTORED, 0, i, 3, i)).collect();
        assert_eq!(irqs, want);
        let lints: Vec<_> = e
            .iter()
            .filter(|(t, _)| *t == ENTRY_LOCAL_INTERRUPT)
            .map(|(_, b)| (b[1], b[6], b[7]))
            .collect();
        assert_eq!(lints, [(INT_EXTINT, 0, 0), (INT_NMI, ALL_LAPICS, 1)]);
    }

    #[test]
    fn every_allowed_vcpu_count_fits_in_the_ebda() {
        assert!(max_vcpus() >= MAX_VCPUS, "{} < {MAX_VCPUS}", max_vcpus());
        assert!(START + size(MAX_VCPUS) as u64 <= END);
        let mem = memory::create(64 << 20).unwrap();
        write(&mem, MAX_VCPUS).unwrap();
        let (_, table) = read_back(&mem);
        let cpus = entries(&table)
            .iter()
            .filter(|(t, _)| *t == ENTRY_PROCESSOR)
            .count();
        assert_eq!(cpus, MAX_VCPUS as usize);
    }

    #[test]
    fn rejects_vcpu_counts_that_do_not_fit() {
        let mem = memory::create(64 << 20).unwrap();
        for vcpus in [0, max_vcpus() + 1] {
            let err = write(&mem, vcpus).unwrap_err();
            assert!(
                matches!(err, Error::BadVcpus { max, .. } if max == max_vcpus()),
                "{err}"
            );
        }
    }
}
