//! `include/wirepool.h` must be what cbindgen generates from `src/ffi` right now.
//! Regenerate with `WIREPOOL_UPDATE_HEADER=1 cargo test --release --test header`.

use std::path::Path;

#[test]
fn committed_header_matches_the_ffi_module() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(root)
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate the header")
        .write(&mut generated);
    let generated = String::from_utf8(generated).expect("header is UTF-8");
    let header_path = root.join("include/wirepool.h");
    if std::env::var_os("WIREPOOL_UPDATE_HEADER").is_some() {
        std::fs::write(&header_path, &generated).expect("writing include/wirepool.h");
        return;
    }
    let committed = std::fs::read_to_string(&header_path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/wirepool.h is stale: regenerate it with \
         `WIREPOOL_UPDATE_HEADER=1 cargo test --release --test header` and commit it"
    );
}
