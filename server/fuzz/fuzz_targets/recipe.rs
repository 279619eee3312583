//! Recipe TOML (server/src/build/recipe.rs) and templates (build/template.rs): arbitrary text
//! never panics; a recipe that parses has only valid image paths and names, and parsing its
//! text again gives the same kind; a template that renders, rendered again from its escaped
//! output, is a fixed point (rendering has no placeholder left to expand).
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use strata_server::build::recipe::{self, check_image_path, valid_name};
use strata_server::build::template::render;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok((r, kind)) = recipe::parse(Path::new("fuzz.toml"), text) {
        for p in r.delete.iter().flat_map(|d| &d.paths).chain(r.dir.iter().map(|d| &d.path)).chain(r.file.iter().map(|f| &f.path)) {
            assert!(check_image_path(p).is_ok(), "accepted path {p:?}");
        }
        if let Some(role) = &r.role {
            assert!(valid_name(&role.name));
        }
        for s in r.sites.keys() {
            assert!(valid_name(s));
        }
        let (_, again) = recipe::parse(Path::new("fuzz.toml"), text).expect("parses twice");
        assert_eq!(again, kind);
    }
    let mut vars = BTreeMap::new();
    vars.insert("name".to_owned(), "value".to_owned());
    vars.insert("a.b-c_d".to_owned(), String::new());
    if let Ok(out) = render(text, &vars) {
        // Values hold no braces, so the output has a placeholder only where the input
        // escaped one; escaping those again renders back to the same output.
        let escaped = out.replace("{{", "\\{{");
        if !out.contains('\\') {
            assert_eq!(render(&escaped, &vars).ok().as_deref(), Some(out.as_str()));
        }
    }
});
