//! Codec modules are checked against ABI v1 at load, with errors that name the problem.

use std::path::{Path, PathBuf};

use crate::support::{compile_wat, compile_wat_text, wat_source};

fn check_error(name: &str) -> String {
    refusal(&compile_wat(name), name)
}

/// The error `check_module_file` refuses the module at `path` with (`what` it is, for
/// the failure message when it does not).
fn refusal(path: &Path, what: &str) -> String {
    match wirepool::check_module_file(path.to_str().expect("utf-8 path")) {
        Ok(report) => panic!("{what} should be refused, got: {report}"),
        Err(err) => err.to_string(),
    }
}

#[test]
fn builtin_codecs_pass_the_check() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for name in ["json", "raw"] {
        let path = root.join(format!("codecs/{name}.wasm"));
        let report = wirepool::check_module_file(path.to_str().expect("utf-8"))
            .unwrap_or_else(|err| panic!("{name}.wasm: {err}"));
        assert!(report.contains("ok"), "{report}");
        assert!(
            report.contains("its shadow stack (1024 KiB) is given back while idle"),
            "{report}"
        );
    }
}

#[test]
fn wrong_abi_version_is_refused_with_both_versions() {
    let text = check_error("bad_version");
    assert!(text.contains("wirepool_abi_version returned 2"), "{text}");
    assert!(text.contains("version 1"), "{text}");
}

#[test]
fn missing_export_is_named() {
    let text = check_error("missing_export");
    assert!(text.contains("does not export wirepool_decode"), "{text}");
}

#[test]
fn foreign_import_is_named() {
    let text = check_error("bad_import");
    assert!(text.contains("env.abort"), "{text}");
}

#[test]
fn wrong_signature_is_named_with_the_expected_one() {
    let text = check_error("wrong_signature");
    assert!(text.contains("wirepool_decode"), "{text}");
    assert!(text.contains("expected (i32, i32) -> (i32)"), "{text}");
}

/// `wirepool_engine_features` is optional, but if exported it must be `(i32) -> ()`;
/// a module exporting it is called before init (`input_refs` fails init otherwise),
/// and a trap in it fails the instance with an error that names it.
#[test]
fn engine_features_export_is_called_before_init_and_checked() {
    let path = compile_wat("input_refs");
    let report = wirepool::check_module_file(path.to_str().expect("utf-8"))
        .unwrap_or_else(|err| panic!("input_refs: {err}"));
    assert!(report.contains("ok"), "{report}");

    let with_result = refused_variant(
        "with_result",
        "(func (export \"wirepool_engine_features\") (param $features i32) (result i32)\n    \
         (global.set $features (local.get $features)) (i32.const 0))",
    );
    assert!(
        with_result.contains("export wirepool_engine_features is")
            && with_result.contains("expected a function (i32) -> ()"),
        "{with_result}"
    );
    let trapping = refused_variant(
        "trapping",
        "(func (export \"wirepool_engine_features\") (param $features i32)\n    unreachable)",
    );
    assert!(
        trapping.contains("wirepool_engine_features trapped"),
        "{trapping}"
    );
}

/// `tests/codecs/input_refs.wat` with its `wirepool_engine_features` replaced by
/// `function`: the error `check_module_file` refuses it with.
fn refused_variant(name: &str, function: &str) -> String {
    let source = wat_source("input_refs");
    let good = "(func (export \"wirepool_engine_features\") (param $features i32)\n    \
                (global.set $features (local.get $features)))";
    assert!(
        source.contains(good),
        "the test codec's export as this test expects it"
    );
    let variant = compile_wat_text(
        &format!("input_refs_{name}"),
        &source.replace(good, function),
    );
    refusal(&variant, &format!("the {name} variant"))
}

#[test]
fn garbage_is_not_a_module() {
    let dir = std::env::temp_dir().join(format!("wirepool-abi-garbage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("garbage.wasm");
    std::fs::write(&path, b"definitely not wasm").expect("write");
    let err = wirepool::check_module_file(path.to_str().expect("utf-8")).expect_err("garbage");
    assert!(err.to_string().contains("not a valid module"), "{err}");
}

#[test]
fn a_codec_that_declares_no_shadow_stack_passes_and_is_told_how() {
    let path = compile_wat("passthrough_probe");
    let report = wirepool::check_module_file(path.to_str().expect("utf-8 path"))
        .unwrap_or_else(|err| panic!("passthrough_probe: {err}"));
    assert!(report.contains("ok"), "{report}");
    assert!(
        report.contains("no shadow stack declared (__stack_low/__stack_high"),
        "{report}"
    );
}
