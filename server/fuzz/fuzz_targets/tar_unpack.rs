//! Unpacking an untrusted tarball into a staging tree (server/src/build/base.rs `Stage`):
//! never panics, never writes outside the stage root (the stage sits two directories deep in
//! a scratch directory; nothing may appear beside it), and everything written inside is a
//! real file, directory or symlink whose parents are real directories. The first byte picks
//! plain tar or OCI layer semantics (whiteouts).
#![no_main]

use std::fs;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use strata_server::build::base::Stage;

fn only_child(dir: &Path, name: &str) {
    let names: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec![name.to_owned()], "something was written beside the stage in {}", dir.display());
}

fn walk(p: &Path) {
    for e in fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        let md = fs::symlink_metadata(e.path()).unwrap();
        assert!(md.is_dir() || md.is_file() || md.file_type().is_symlink(), "odd file type at {}", e.path().display());
        if md.is_dir() {
            walk(&e.path());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, tar)) = data.split_first() else { return };
    let base = if Path::new("/dev/shm").is_dir() { tempfile::tempdir_in("/dev/shm") } else { tempfile::tempdir() }.unwrap();
    let outer = base.path().join("a");
    let inner = outer.join("b");
    let root = inner.join("root");
    fs::create_dir_all(&root).unwrap();
    let mut stage = Stage::new(root.clone());
    let _ = stage.unpack(Path::new("fuzz.tar"), tar, mode & 1 == 1);
    only_child(base.path(), "a");
    only_child(&outer, "b");
    only_child(&inner, "root");
    walk(&root);
});
