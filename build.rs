//! Builds the built-in test guest (src/guest/testguest.S) with the GNU
//! assembler and linker into an ELF image that the binary embeds.
use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install binutils)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let src = "src/guest/testguest.S";
    let lds = "src/guest/testguest.ld";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-changed={lds}");
    let obj = out.join("testguest.o");
    let elf = out.join("testguest.elf");
    run(Command::new("as").args(["--64", "-o"]).arg(&obj).arg(src));
    run(Command::new("ld")
        .args([
            "-nostdlib",
            "-static",
            "--no-dynamic-linker",
            "-z",
            "max-page-size=4096",
            "--no-warn-rwx-segments",
            "-T",
            lds,
            "-o",
        ])
        .arg(&elf)
        .arg(&obj));
}
