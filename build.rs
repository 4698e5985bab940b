//! Links libtorch into the extension so the wheel loads the installed torch's own libraries.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Rust test binaries load libtorch from the torch install torch-sys found.
    if let Some(dir) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
        println!(
            "cargo:rustc-link-arg-tests=-Wl,-rpath,{}",
            dir.to_string_lossy()
        );
    }
    if std::env::var_os("CARGO_FEATURE_PYTHON").is_none() {
        return;
    }
    // pyo3-tch's link arguments do not reach a cdylib, and --as-needed would drop libtorch.
    println!("cargo:rustc-link-arg-cdylib=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg-cdylib=-ltorch");
    println!("cargo:rustc-link-arg-cdylib=-Wl,--as-needed");
    println!("cargo:rustc-link-arg-cdylib=-Wl,-rpath,$ORIGIN/../torch/lib");
}
