//! OCI image archives and `docker save` archives (server/src/build/base.rs `unpack_oci`):
//! untrusted index/manifest JSON, blob names and digests never panic, never write outside
//! the stage root, and an archive is only unpacked when its blobs match their sha256
//! (checked by the code; here: no panic and no escape whatever the bytes).
#![no_main]

use std::fs;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use strata_server::build::base::{unpack_oci, Stage};

fuzz_target!(|data: &[u8]| {
    let base = if Path::new("/dev/shm").is_dir() { tempfile::tempdir_in("/dev/shm") } else { tempfile::tempdir() }.unwrap();
    let archive = base.path().join("image.tar");
    fs::write(&archive, data).unwrap();
    let inner = base.path().join("a");
    let root = inner.join("root");
    fs::create_dir_all(&root).unwrap();
    let mut stage = Stage::new(root.clone());
    let _ = unpack_oci(&mut stage, &archive);
    let mut names: Vec<String> = fs::read_dir(base.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, vec!["a".to_owned(), "image.tar".to_owned()], "something was written beside the stage");
    let inner_names: Vec<String> = fs::read_dir(&inner).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(inner_names, vec!["root".to_owned()]);
});
