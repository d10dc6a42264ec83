//! Builds kernels/ with nvcc (through the `cc` crate) into a static library, links the
//! CUDA runtime statically, and generates the Rust FFI of kernels/include/*.h with
//! bindgen. Only runs with the `cuda` feature; without it the crate is CPU-only. With the
//! `emulator` feature instead, the same sources are compiled as host C++ against the CPU
//! emulator of tests/emulator (see `build_emulated_kernels`), with the same bindings.
//!
//! Environment:
//! - `NVCC`: the nvcc to use (default: `nvcc` on PATH).
//! - `FLASHKERNELS_CUDA_ARCHS`: comma-separated targets, `sm_XX` for machine code and
//!   `compute_XX` for PTX (default: sm_80,sm_86,sm_89,sm_90a,compute_90).
//! - `FLASHKERNELS_KERNEL_CACHE`: a folder where the compiled kernel library is kept,
//!   keyed by a hash of the sources, targets and compiler, so the release, test and
//!   Python builds compile the kernels once between them.
//! - `LIBCLANG_PATH`: where bindgen finds libclang.
//! - `FLASHKERNELS_CUDA_INCLUDE` (`emulator` only): the CUDA headers (default: nvcc's
//!   `../include`); the emulated library is cached in `FLASHKERNELS_KERNEL_CACHE` too.
//!
//! On x86_64 Linux (glibc) it also pins the Python extension (the cdylib) to glibc 2.28
//! symbol versions, whatever the build machine's glibc, so that the wheel is
//! manylinux_2_28 like torch's: see `glibc_2_28_compat`.

use std::collections::hash_map::DefaultHasher;
use std::env;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_ARCHS: &str = "sm_80,sm_86,sm_89,sm_90a,compute_90";
const LIB_NAME: &str = "flashkernels_cuda";
const EMU_LIB_NAME: &str = "flashkernels_emulated";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "FLASHKERNELS_CUDA_ARCHS",
        "FLASHKERNELS_KERNEL_CACHE",
        "LIBCLANG_PATH",
        "FLASHKERNELS_CUDA_INCLUDE",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    glibc_2_28_compat(&out_dir);
    let emulator = env::var_os("CARGO_FEATURE_EMULATOR").is_some();
    if emulator && env::var_os("CARGO_FEATURE_CUDA").is_some() {
        panic!(
            "\n\nflashkernels: the `emulator` and `cuda` features exclude each other (one device \
             backend per build): `cargo build --no-default-features --features emulator`.\n\n"
        );
    }
    if emulator {
        build_emulated_kernels(&out_dir);
        generate_bindings(&out_dir);
        return;
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }

    let nvcc = find_nvcc();
    let cuda_lib_dir = nvcc
        .parent()
        .and_then(Path::parent)
        .map(|root| root.join("lib"))
        .expect("nvcc lives in <cuda>/bin");

    let archs = env::var("FLASHKERNELS_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.into());
    let gencodes = gencode_flags(&archs);
    let sources = kernel_sources(Path::new("kernels"));
    let key = cache_key(&nvcc, &gencodes, &sources);

    let lib_file = out_dir.join(format!("lib{LIB_NAME}.a"));
    let cached = env::var_os("FLASHKERNELS_KERNEL_CACHE").map(|dir| {
        PathBuf::from(dir)
            .join(format!("{key:016x}"))
            .join(lib_file.file_name().unwrap())
    });
    match cached.as_ref().filter(|c| c.exists()) {
        Some(hit) => {
            fs::copy(hit, &lib_file).expect("copy cached kernel library");
        }
        None => {
            compile_kernels(&nvcc, &gencodes, &sources);
            if let Some(c) = &cached {
                // A failed cache write only costs a rebuild next time.
                let _ =
                    fs::create_dir_all(c.parent().unwrap()).and_then(|_| fs::copy(&lib_file, c));
            }
        }
    }

    println!("cargo:rustc-link-search=native={}", out_dir.display());
    println!("cargo:rustc-link-lib=static={LIB_NAME}");
    // The PyPI layout keeps libcudart_static.a in <cuda>/lib, not targets/<arch>/lib.
    println!("cargo:rustc-link-search=native={}", cuda_lib_dir.display());
    println!("cargo:rustc-link-lib=static=cudart_static");
    for lib in ["stdc++", "dl", "rt", "pthread"] {
        println!("cargo:rustc-link-lib={lib}");
    }

    generate_bindings(&out_dir);
}

fn find_nvcc() -> PathBuf {
    let candidate = env::var_os("NVCC").map(PathBuf::from).or_else(|| {
        env::var_os("PATH").and_then(|paths| {
            env::split_paths(&paths)
                .map(|p| p.join("nvcc"))
                .find(|p| p.is_file())
        })
    });
    match candidate.filter(|p| p.is_file()) {
        Some(p) => p,
        None => panic!(
            "\n\nflashkernels: nvcc not found (looked at $NVCC and PATH).\n\
             - Get it from PyPI into the project's toolchain folder: `scripts/bootstrap.sh`,\n\
               then `eval \"$(scripts/bootstrap.sh --env)\"` (nvcc 13.0, no root needed).\n\
             - Or build the CPU-only library: `cargo build --no-default-features`.\n\n"
        ),
    }
}

fn gencode_flags(archs: &str) -> Vec<String> {
    let flags: Vec<String> = archs
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| {
            if let Some(n) = a.strip_prefix("sm_") {
                format!("-gencode=arch=compute_{n},code=sm_{n}")
            } else if let Some(n) = a.strip_prefix("compute_") {
                format!("-gencode=arch=compute_{n},code=compute_{n}")
            } else {
                panic!("FLASHKERNELS_CUDA_ARCHS: `{a}` is neither sm_XX nor compute_XX")
            }
        })
        .collect();
    assert!(!flags.is_empty(), "FLASHKERNELS_CUDA_ARCHS names no target");
    flags
}

/// Every file under `dir` (kernels/, tests/emulator/), sorted, so the cache key is stable.
fn kernel_sources(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).expect("read a source folder") {
            let path = entry.expect("source folder entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn cache_key(nvcc: &Path, gencodes: &[String], sources: &[PathBuf]) -> u64 {
    let mut h = DefaultHasher::new();
    // How the library is put together (bump when compile_kernels changes what it makes).
    "one nvcc call per source, whole-program device code".hash(&mut h);
    nvcc_flags().hash(&mut h);
    gencodes.hash(&mut h);
    let version = Command::new(nvcc)
        .arg("--version")
        .output()
        .map(|o| o.stdout);
    version.unwrap_or_default().hash(&mut h);
    for s in sources {
        s.hash(&mut h);
        fs::read(s).expect("read kernel source").hash(&mut h);
    }
    h.finish()
}

fn nvcc_flags() -> Vec<&'static str> {
    vec!["-std=c++17", "--use_fast_math"]
}

fn compile_kernels(nvcc: &Path, gencodes: &[String], sources: &[PathBuf]) {
    // cc picks nvcc up from $NVCC when building CUDA; `.compiler()` would make it treat
    // nvcc as a host compiler and pass it gcc flags.
    env::set_var("NVCC", nvcc);
    let mut build = cc::Build::new();
    build
        .cuda(true)
        .cargo_metadata(false)
        .warnings(false)
        .extra_warnings(false)
        .debug(false) // cc would pass -G, which makes device code unusably slow
        .opt_level(3)
        .include("kernels/include");
    for f in nvcc_flags() {
        build.flag(f);
    }
    for g in gencodes {
        build.flag(g);
    }
    // One build (one nvcc call) per source, so that none is relocatable device code: cc
    // passes --device-c as soon as a build has two .cu files, and under it ptxas ignores
    // setmaxnreg and serializes wgmma (C7504, C7509), which would cost the Hopper kernels
    // both. No kernel calls device code of another file, so nothing needs a device link.
    let units: Vec<&PathBuf> = sources
        .iter()
        .filter(|s| s.extension().is_some_and(|e| e == "cu"))
        .collect();
    let workers = env::var("NUM_JOBS")
        .ok()
        .and_then(|j| j.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, units.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let objects = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(unit) = units.get(i) else { break };
                let mut one = build.clone();
                one.file(unit);
                let objs = one.compile_intermediates();
                objects.lock().unwrap().extend(objs);
            });
        }
    });
    let mut objects = objects.into_inner().unwrap();
    objects.sort();
    cc::Build::new()
        .cargo_metadata(false)
        .objects(objects)
        .compile(LIB_NAME);
}

/// Feature `emulator`: the same kernels/ sources, each `.cu` its own translation unit as
/// under nvcc, compiled as host C++ against the CPU emulator of tests/emulator (the device
/// of rust/device/emulated.rs). The kernels include `../common/launch.cuh` and
/// `../common/mma_sm80.cuh` relative to themselves, so they are compiled through an overlay
/// of symlinks in OUT_DIR, as scripts/emulate_kernels.sh does: `emulated/<folder>/*` are
/// the real files of kernels/<folder>/ (attention, conv, include); `emulated/common/` holds tests/emulator/device/* (the
/// serialized launch), then tests/emulator/mock/* (the emulated instructions), then the
/// real kernels/common/* for what neither replaces. The C ABI is untouched, so ffi.rs is
/// the same. Only the CUDA headers (cuda_fp16.h, cuda_runtime.h for dim3 and error codes)
/// are needed, from the toolchain nvcc comes with; nvcc itself is not run.
fn build_emulated_kernels(out_dir: &Path) {
    // What the library is made of besides kernels/: the emulator's headers and the device
    // sources, not the C++ suites beside them (`*_test.cpp`, negative/).
    let emulator_sources: Vec<PathBuf> = kernel_sources(Path::new("tests/emulator"))
        .into_iter()
        .filter(|p| {
            !p.starts_with("tests/emulator/negative") && !p.to_string_lossy().ends_with("_test.cpp")
        })
        .collect();
    for p in &emulator_sources {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    println!("cargo:rerun-if-changed=tests/emulator/mock");
    println!("cargo:rerun-if-changed=tests/emulator/device");
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let emu_dir = root.join("tests/emulator");
    let cuda_include = find_cuda_include();

    let overlay = out_dir.join("emulated");
    if overlay.exists() {
        fs::remove_dir_all(&overlay).expect("clear the emulator overlay");
    }
    let common = overlay.join("common");
    fs::create_dir_all(&common).expect("create the emulator overlay");
    // File by file: `emulated/attention/../common` must be the overlay's common/, which a
    // symlinked folder would not give (`..` of a symlinked folder is its target's parent).
    for entry in fs::read_dir(root.join("kernels")).expect("read kernels/") {
        let dir = entry.expect("kernels/ entry").path();
        let name = dir.file_name().unwrap().to_owned();
        if !dir.is_dir() || name == "common" {
            continue;
        }
        link_files(&dir, &overlay.join(&name));
    }
    for source in [
        emu_dir.join("device"),
        emu_dir.join("mock"),
        root.join("kernels/common"),
    ] {
        for entry in fs::read_dir(&source).expect("read an overlay source folder") {
            let path = entry.expect("overlay entry").path();
            let link = common.join(path.file_name().unwrap());
            let header = path.extension().is_some_and(|e| e == "cuh" || e == "h");
            if header && !link.exists() {
                symlink(&path, &link);
            }
        }
    }

    // One wrapper per .cu, including it through the overlay so its quoted includes resolve
    // there.
    let wrappers = out_dir.join("emulated_sources");
    fs::create_dir_all(&wrappers).expect("create the wrapper folder");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .cargo_metadata(false)
        .warnings(false)
        .extra_warnings(false)
        .debug(false)
        .opt_level(2)
        .std("c++17")
        // The kernels type-pun through reinterpret_cast, as CUDA code may.
        .flag("-fno-strict-aliasing")
        // A CUtensorMap kernel parameter (128-byte aligned) draws GCC's note that its
        // passing changed in GCC 4.6: nothing here links against old code.
        .flag("-Wno-psabi")
        .include(out_dir)
        .include(&emu_dir)
        .include(&root)
        .flag("-isystem")
        .flag(cuda_include.to_str().expect("UTF-8 CUDA include path"));
    for s in kernel_sources(Path::new("kernels")) {
        if s.extension().is_none_or(|e| e != "cu") {
            continue;
        }
        let rel = s.strip_prefix("kernels").unwrap();
        let name = rel.to_string_lossy().replace(['/', '\\'], "_");
        let wrapper = wrappers.join(format!("{name}.cpp"));
        let text = format!(
            "// Generated by build.rs (feature `emulator`).\n#include \"emulated/{}\"\n",
            rel.to_string_lossy()
        );
        if fs::read_to_string(&wrapper).ok().as_deref() != Some(text.as_str()) {
            fs::write(&wrapper, text).expect("write a kernel wrapper");
        }
        build.file(&wrapper);
    }
    build.file(emu_dir.join("device/runtime.cpp"));

    // The kernel cache, as for nvcc's library: keyed by the compiler, the flags and every
    // source the library is made of (kernels/ and the emulator).
    let mut key = DefaultHasher::new();
    "emulator".hash(&mut key);
    let compiler = build.get_compiler();
    compiler.args().hash(&mut key);
    Command::new(compiler.path())
        .arg("--version")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default()
        .hash(&mut key);
    let mut sources = kernel_sources(Path::new("kernels"));
    sources.extend(emulator_sources);
    for s in &sources {
        s.hash(&mut key);
        fs::read(s).expect("read a source").hash(&mut key);
    }
    let lib_file = out_dir.join(format!("lib{EMU_LIB_NAME}.a"));
    let cached = env::var_os("FLASHKERNELS_KERNEL_CACHE").map(|dir| {
        PathBuf::from(dir)
            .join(format!("emulated-{:016x}", key.finish()))
            .join(lib_file.file_name().unwrap())
    });
    match cached.as_ref().filter(|c| c.exists()) {
        Some(hit) => {
            fs::copy(hit, &lib_file).expect("copy the cached emulated kernel library");
        }
        None => {
            build.compile(EMU_LIB_NAME);
            if let Some(c) = &cached {
                // A failed cache write only costs a rebuild next time.
                let _ =
                    fs::create_dir_all(c.parent().unwrap()).and_then(|_| fs::copy(&lib_file, c));
            }
        }
    }

    println!("cargo:rustc-link-search=native={}", out_dir.display());
    println!("cargo:rustc-link-lib=static={EMU_LIB_NAME}");
    println!("cargo:rustc-link-lib=stdc++");
}

/// The CUDA headers of the toolchain nvcc comes with (`<nvcc>/../include`), or
/// `$FLASHKERNELS_CUDA_INCLUDE`.
fn find_cuda_include() -> PathBuf {
    if let Some(dir) = env::var_os("FLASHKERNELS_CUDA_INCLUDE") {
        return PathBuf::from(dir);
    }
    let nvcc = find_nvcc();
    let dir = nvcc
        .parent()
        .and_then(Path::parent)
        .map(|root| root.join("include"))
        .expect("nvcc lives in <cuda>/bin");
    assert!(
        dir.join("cuda_fp16.h").is_file(),
        "flashkernels: no cuda_fp16.h in {} (set FLASHKERNELS_CUDA_INCLUDE)",
        dir.display()
    );
    dir
}

fn symlink(target: &Path, link: &Path) {
    #[cfg(unix)]
    std::os::unix::fs::symlink(target, link).unwrap_or_else(|e| {
        panic!(
            "flashkernels: symlink {} -> {}: {e}",
            link.display(),
            target.display()
        )
    });
    #[cfg(not(unix))]
    panic!(
        "flashkernels: the `emulator` feature needs symlinks (Unix); cannot link {} -> {}",
        link.display(),
        target.display()
    );
}

fn generate_bindings(out_dir: &Path) {
    let mut builder = bindgen::Builder::default()
        .allowlist_function("fk_.*")
        .allowlist_type("fk_.*")
        .allowlist_var("FK_.*")
        .derive_default(true)
        .layout_tests(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    let mut headers: Vec<PathBuf> = fs::read_dir("kernels/include")
        .expect("read kernels/include")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "h"))
        .collect();
    headers.sort();
    for h in &headers {
        builder = builder.header(h.to_string_lossy());
    }
    builder
        .generate()
        .unwrap_or_else(|e| {
            panic!(
                "\n\nflashkernels: bindgen failed ({e}). It needs libclang: run \
                 `scripts/bootstrap.sh` and `eval \"$(scripts/bootstrap.sh --env)\"` \
                 (sets LIBCLANG_PATH), or `apt-get install libclang-dev`.\n\n"
            )
        })
        .write_to_file(out_dir.join("ffi.rs"))
        .expect("write ffi.rs");
}

/// glibc functions whose default symbol version on a newer glibc (Debian 12 has 2.36) is
/// past 2.28, each with the older version of the same function, present in every glibc
/// from 2.28 on. A linker binds an unversioned reference (from Rust's std, from
/// libcudart_static.a) to the default version of the glibc it links against, which made
/// the wheel manylinux_2_34: the 2.34 ones moved from libpthread/libdl/librt into libc
/// and got a new version there, the old version staying as an alias of the same code; the
/// libm ones got new versions in 2.29 (new implementations, same ABI). maturin checks the
/// extension against manylinux_2_28 (`compatibility` in pyproject.toml) and names any
/// symbol that still escapes: add it here.
const GLIBC_COMPAT: &[(&str, &str)] = &[
    ("exp", "GLIBC_2.2.5"),
    ("exp2", "GLIBC_2.2.5"),
    ("log", "GLIBC_2.2.5"),
    ("log2", "GLIBC_2.2.5"),
    ("pow", "GLIBC_2.2.5"),
    ("dlclose", "GLIBC_2.2.5"),
    ("dlerror", "GLIBC_2.2.5"),
    ("dlmopen", "GLIBC_2.3.4"),
    ("dlopen", "GLIBC_2.2.5"),
    ("dlsym", "GLIBC_2.2.5"),
    ("dlvsym", "GLIBC_2.2.5"),
    ("pthread_attr_getguardsize", "GLIBC_2.2.5"),
    ("pthread_attr_getstack", "GLIBC_2.2.5"),
    ("pthread_attr_setstacksize", "GLIBC_2.2.5"),
    ("pthread_condattr_setpshared", "GLIBC_2.2.5"),
    ("pthread_create", "GLIBC_2.2.5"),
    ("pthread_detach", "GLIBC_2.2.5"),
    ("pthread_getattr_np", "GLIBC_2.2.5"),
    ("pthread_getspecific", "GLIBC_2.2.5"),
    ("pthread_join", "GLIBC_2.2.5"),
    ("pthread_key_create", "GLIBC_2.2.5"),
    ("pthread_key_delete", "GLIBC_2.2.5"),
    ("pthread_kill", "GLIBC_2.2.5"),
    ("pthread_mutex_trylock", "GLIBC_2.2.5"),
    ("pthread_mutexattr_destroy", "GLIBC_2.2.5"),
    ("pthread_mutexattr_init", "GLIBC_2.2.5"),
    ("pthread_mutexattr_setpshared", "GLIBC_2.2.5"),
    ("pthread_mutexattr_settype", "GLIBC_2.2.5"),
    ("pthread_once", "GLIBC_2.2.5"),
    ("pthread_rwlock_destroy", "GLIBC_2.2.5"),
    ("pthread_rwlock_init", "GLIBC_2.2.5"),
    ("pthread_rwlock_rdlock", "GLIBC_2.2.5"),
    ("pthread_rwlock_timedrdlock", "GLIBC_2.2.5"),
    ("pthread_rwlock_timedwrlock", "GLIBC_2.2.5"),
    ("pthread_rwlock_tryrdlock", "GLIBC_2.2.5"),
    ("pthread_rwlock_trywrlock", "GLIBC_2.2.5"),
    ("pthread_rwlock_unlock", "GLIBC_2.2.5"),
    ("pthread_rwlock_wrlock", "GLIBC_2.2.5"),
    ("pthread_rwlockattr_destroy", "GLIBC_2.2.5"),
    ("pthread_rwlockattr_init", "GLIBC_2.2.5"),
    ("pthread_rwlockattr_setpshared", "GLIBC_2.2.5"),
    ("pthread_setname_np", "GLIBC_2.12"),
    ("pthread_setspecific", "GLIBC_2.2.5"),
    ("pthread_sigmask", "GLIBC_2.2.5"),
    ("pthread_spin_destroy", "GLIBC_2.2.5"),
    ("pthread_spin_init", "GLIBC_2.2.5"),
    ("pthread_spin_lock", "GLIBC_2.2.5"),
    ("pthread_spin_trylock", "GLIBC_2.2.5"),
    ("pthread_spin_unlock", "GLIBC_2.2.5"),
    ("sem_destroy", "GLIBC_2.2.5"),
    ("sem_init", "GLIBC_2.2.5"),
    ("sem_post", "GLIBC_2.2.5"),
    ("sem_timedwait", "GLIBC_2.2.5"),
    ("sem_trywait", "GLIBC_2.2.5"),
    ("sem_wait", "GLIBC_2.2.5"),
    ("shm_open", "GLIBC_2.2.5"),
    ("shm_unlink", "GLIBC_2.2.5"),
];

/// Functions Rust's std uses that glibc 2.28 does not export at all, written here on top
/// of what 2.28 has (x86_64 assembly, `;` separates instructions): gettid (2.30) is the
/// raw syscall; fstat64 / stat64 / lstat64 (2.33) were, before 2.33, inline wrappers
/// around __fxstat64 / __xstat64 / __lxstat64 with _STAT_VER 1, which glibc still exports.
const GLIBC_SHIMS: &[(&str, &str)] = &[
    ("gettid", "mov $186, %eax; syscall; ret"),
    (
        "fstat64",
        "mov %rsi, %rdx; mov %edi, %esi; mov $1, %edi; jmp __fxstat64@PLT",
    ),
    (
        "stat64",
        "mov %rsi, %rdx; mov %rdi, %rsi; mov $1, %edi; jmp __xstat64@PLT",
    ),
    (
        "lstat64",
        "mov %rsi, %rdx; mov %rdi, %rsi; mov $1, %edi; jmp __lxstat64@PLT",
    ),
];

/// Links the cdylib with `--wrap=NAME` for every function above, against a generated
/// assembly file whose hidden `__wrap_NAME` jumps to `NAME@OLD_VERSION` (or runs the shim).
/// Each wrapper has its own section, so `--gc-sections` drops those nothing calls. It also
/// keeps libpthread.so.0, libdl.so.2 and librt.so.1 as DT_NEEDED: before glibc 2.34 the
/// old versions live there, not in libc.so.6 (from 2.34 on they are empty stubs).
fn glibc_2_28_compat(out_dir: &Path) {
    let target_is = |var: &str, want: &str| env::var(var).is_ok_and(|v| v == want);
    if !(target_is("CARGO_CFG_TARGET_OS", "linux")
        && target_is("CARGO_CFG_TARGET_ENV", "gnu")
        && target_is("CARGO_CFG_TARGET_ARCH", "x86_64"))
    {
        return;
    }
    let mut asm = String::from("# Generated by build.rs (glibc_2_28_compat).\n");
    let mut wrappers: Vec<(&str, String)> = Vec::new();
    for (name, version) in GLIBC_COMPAT {
        asm.push_str(&format!(".symver fk_compat_{name}, {name}@{version}\n"));
        wrappers.push((name, format!("jmp fk_compat_{name}@PLT")));
    }
    wrappers.extend(
        GLIBC_SHIMS
            .iter()
            .map(|(name, body)| (*name, body.to_string())),
    );
    for (name, body) in &wrappers {
        asm.push_str(&format!(
            ".section .text.__wrap_{name},\"ax\",@progbits\n\
             .globl __wrap_{name}\n.hidden __wrap_{name}\n.type __wrap_{name}, @function\n\
             __wrap_{name}: {body}\n.size __wrap_{name}, . - __wrap_{name}\n"
        ));
    }
    asm.push_str(".section .note.GNU-stack,\"\",@progbits\n");
    let src = out_dir.join("glibc_2_28_compat.s");
    fs::write(&src, asm).expect("write glibc_2_28_compat.s");
    let objects = cc::Build::new()
        .file(&src)
        .cargo_metadata(false)
        .warnings(false)
        .compile_intermediates();
    for obj in objects {
        println!("cargo:rustc-cdylib-link-arg={}", obj.display());
    }
    let wrap: Vec<String> = wrappers
        .iter()
        .map(|(n, _)| format!("--wrap={n}"))
        .collect();
    println!("cargo:rustc-cdylib-link-arg=-Wl,{}", wrap.join(","));
    println!(
        "cargo:rustc-cdylib-link-arg=-Wl,--push-state,--no-as-needed,\
         -l:libpthread.so.0,-l:libdl.so.2,-l:librt.so.1,--pop-state"
    );
}

/// Mirrors `src` into `dst` as real folders of symlinked files, at every depth, so that a
/// `..` in an include resolves inside the overlay (a symlinked folder's `..` would be its
/// target's parent: kernels/attention/common/*.cuh would then reach the real
/// kernels/common/ instead of the emulator's).
fn link_files(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).expect("create an overlay folder");
    for entry in fs::read_dir(src).expect("read a kernels/ folder") {
        let path = entry.expect("kernel file").path();
        let target = dst.join(path.file_name().unwrap());
        if path.is_dir() {
            link_files(&path, &target);
        } else {
            symlink(&path, &target);
        }
    }
}
