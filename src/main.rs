//! The `stasis` command line: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use stasis::guest::{self, Workload};
use stasis::vmm::{Console, ConsoleBuffer, Kernel, Vm, VmConfig};

#[derive(Parser)]
#[command(name = "stasis", version, about = "Sandboxes on KVM that pause to disk and resume in milliseconds")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a kernel (or, without --kernel, the built-in test guest) and run it to the end.
    Run(RunArgs),
    /// Boot the built-in test guest on a workload and report what happened.
    Demo {
        /// MiB of guest memory the workload fills and mutates.
        #[arg(long, default_value_t = 256)]
        mib: u64,
        /// Mutate-and-hash rounds.
        #[arg(long, default_value_t = 40)]
        rounds: u64,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// ELF vmlinux or bzImage; without it, the built-in test guest.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (for the test guest: stasis.mib=N stasis.rounds=N stasis.seed=N).
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory, e.g. 512M or 2G.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    mem: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Write the serial console to this file instead of stdout.
    #[arg(long)]
    console: Option<PathBuf>,
}

/// Parses "512M", "2G", "65536K" or a plain byte count.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 512M, 2G)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STASIS_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Demo { mib, rounds } => demo(mib, rounds),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stasis: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Renders an error with its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

fn run(a: RunArgs) -> Result<ExitCode, String> {
    let kernel = match a.kernel {
        Some(p) => Kernel::Path(p),
        None => Kernel::TestGuest,
    };
    let cmdline = a.cmdline.unwrap_or_else(|| match kernel {
        Kernel::TestGuest => Workload::default().cmdline(),
        Kernel::Path(_) => "console=ttyS0 reboot=k panic=1 pci=off".into(),
    });
    let cfg = VmConfig {
        kernel,
        initrd: a.initrd,
        cmdline,
        mem_bytes: a.mem,
        vcpus: a.vcpus,
        console: a.console.map(Console::File).unwrap_or(Console::Stdout),
    };
    let vm = Vm::boot(cfg).map_err(|e| chain(&e))?;
    let reason = vm.wait(None).unwrap_or(stasis::vmm::ExitReason::Killed);
    drop(vm);
    match reason {
        stasis::vmm::ExitReason::GuestExit(c) => Ok(ExitCode::from(c)),
        r if r.is_clean() => Ok(ExitCode::SUCCESS),
        r => Err(r.to_string()),
    }
}

fn demo(mib: u64, rounds: u64) -> Result<ExitCode, String> {
    let w = Workload {
        mib,
        rounds,
        seed: 42,
        report: (rounds / 8).max(1),
    };
    let console = ConsoleBuffer::new();
    let cfg = VmConfig {
        cmdline: w.cmdline(),
        mem_bytes: (w.min_mem_bytes() + (64 << 20)).next_multiple_of(2 << 20),
        console: Console::Buffer(console.clone()),
        ..VmConfig::default()
    };
    println!("stasis demo: built-in test guest, {mib} MiB workload, {rounds} rounds, {} MiB guest", cfg.mem_bytes >> 20);
    let t0 = Instant::now();
    let vm = Vm::boot(cfg).map_err(|e| chain(&e))?;
    let boot = t0.elapsed();
    let reason = vm.wait(Some(Duration::from_secs(600)));
    let total = t0.elapsed();
    drop(vm);
    print!("{}", console.text());
    let expected = guest::reference(&w);
    let got = guest::parse_checksum(&console.text());
    println!("boot (VM created, vCPU started): {:.1} ms", boot.as_secs_f64() * 1e3);
    println!("run to the end: {:.3} s, exit: {}", total.as_secs_f64(), reason.map(|r| r.to_string()).unwrap_or("timeout".into()));
    let ok = got == Some(expected.checksum);
    println!(
        "checksum: guest {} / expected {:016x} -> {}",
        got.map(|c| format!("{c:016x}")).unwrap_or("missing".into()),
        expected.checksum,
        if ok { "MATCH" } else { "MISMATCH" }
    );
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
