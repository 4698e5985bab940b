//! Links libtorch into the extension so the wheel loads the installed torch's own libraries, and tells
//! the extension which torch it is built for (torch-versions.txt: the torch versions that build serves).

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=torch-versions.txt");
    // torch-sys found libtorch in the build environment's torch (LIBTORCH_USE_PYTORCH, .cargo/config.toml).
    let libtorch = std::env::var("DEP_TCH_LIBTORCH_LIB").ok();
    // Rust test binaries load libtorch from the torch install torch-sys found.
    if let Some(dir) = &libtorch {
        println!("cargo:rustc-link-arg-tests=-Wl,-rpath,{dir}");
    }
    export_torch_build(libtorch.as_deref());
    if std::env::var_os("CARGO_FEATURE_PYTHON").is_none() {
        return;
    }
    // pyo3-tch's link arguments do not reach a cdylib, and --as-needed would drop libtorch.
    println!("cargo:rustc-link-arg-cdylib=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg-cdylib=-ltorch");
    println!("cargo:rustc-link-arg-cdylib=-Wl,--as-needed");
    println!("cargo:rustc-link-arg-cdylib=-Wl,-rpath,$ORIGIN/../torch/lib");
}

/// MOBILEONE_TORCH_BUILT_FOR (the libtorch version compiled against, e.g. 2.11.0), _SUPPORTED (the
/// torch minors this build serves, e.g. 2.11,2.12), _REQUIREMENT (torch>=2.11,<2.13) and _BUILDS (every
/// torch minor and the build serving it, 2.9=2.9,...,2.12=2.11,...) for the native module.
fn export_torch_build(libtorch: Option<&str>) {
    let built_for = libtorch.and_then(|dir| libtorch_version(Path::new(dir))).unwrap_or_else(|| {
        panic!("cannot tell the libtorch version torch-sys built against (libtorch lib dir: {libtorch:?})")
    });
    let minor = built_for.split('.').take(2).collect::<Vec<_>>().join(".");
    let table = std::fs::read_to_string("torch-versions.txt").expect("torch-versions.txt");
    // Rows: torch, build, tch, torchvision.
    let rows: Vec<Vec<&str>> = table
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect())
        .filter(|r: &Vec<&str>| r.len() >= 2)
        .collect();
    let served: Vec<&str> = rows
        .iter()
        .filter(|r| r[1] == minor)
        .map(|r| r[0])
        .collect();
    if served.is_empty() {
        panic!("libtorch {built_for}: torch {minor} has no build row in torch-versions.txt");
    }
    let last = served.last().expect("served is not empty");
    let (major, last_minor) = last
        .split_once('.')
        .expect("torch versions are major.minor");
    let upper: u32 = last_minor.parse::<u32>().expect("a numeric minor") + 1;
    let builds: Vec<String> = rows.iter().map(|r| format!("{}={}", r[0], r[1])).collect();
    let env = [
        ("BUILT_FOR", built_for.clone()),
        ("SUPPORTED", served.join(",")),
        (
            "REQUIREMENT",
            format!("torch>={},<{major}.{upper}", served[0]),
        ),
        ("BUILDS", builds.join(",")),
    ];
    for (name, value) in env {
        println!("cargo:rustc-env=MOBILEONE_TORCH_{name}={value}");
    }
}

/// The version of the torch install whose lib dir this is (torch/version.py), or of a libtorch
/// download (build-version), without a local suffix such as +cu130.
fn libtorch_version(lib: &Path) -> Option<String> {
    let root = lib.parent()?;
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        let line = text.lines().find(|l| l.starts_with("__version__"))?;
        let version = line.split(['\'', '"']).nth(1)?;
        return Some(version.split('+').next()?.to_string());
    }
    let text = std::fs::read_to_string(root.join("build-version")).ok()?;
    Some(text.trim().split('+').next()?.to_string())
}
