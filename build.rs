//! Builds the built-in test guest (src/guest/testguest.S) with the GNU
//! assembler and linker into an ELF image that the binary embeds, and
//! generates the agent's protobuf types (proto/*.proto) with prost and their
//! protobuf-JSON mapping with pbjson. The .proto files are parsed by protox
//! (pure Rust), so no system `protoc` is needed.
use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install binutils)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

/// Compiles proto/process.proto and proto/filesystem.proto into
/// `$OUT_DIR/{process,filesystem}.rs` (prost messages) and
/// `$OUT_DIR/{process,filesystem}.serde.rs` (protobuf-JSON serde impls).
fn protos(out: &std::path::Path) {
    use protox::prost::Message;
    let files = ["proto/process.proto", "proto/filesystem.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"]).unwrap_or_else(|e| panic!("proto: {e:?}"));
    let bytes = fds.encode_to_vec();
    prost_build::Config::new()
        .out_dir(out)
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .bytes(["."])
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("prost-build: {e}"));
    pbjson_build::Builder::new()
        .out_dir(out)
        .register_descriptors(&bytes)
        .unwrap_or_else(|e| panic!("pbjson-build: {e}"))
        .extern_path(".google.protobuf", "::pbjson_types")
        .ignore_unknown_fields()
        .build(&[".process", ".filesystem"])
        .unwrap_or_else(|e| panic!("pbjson-build: {e}"));
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    protos(&out);
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
