//! The example manifests in `deploy/examples`: the valid ones load cleanly, and each invalid
//! one yields exactly the diagnostics in its `.expected` file (regenerate with UPDATE_EXPECT=1).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_manifest_is_valid_without_warnings() {
    let files = yaml_files(&examples_dir());
    assert!(files.len() >= 4, "the documented examples");
    for file in files {
        let src = std::fs::read_to_string(&file).unwrap();
        match fleet::load(&src) {
            Ok(loaded) => assert!(
                loaded.warnings.is_empty(),
                "{}: {:?}",
                file.display(),
                loaded.warnings
            ),
            Err(diags) => panic!("{} is invalid: {diags:#?}", file.display()),
        }
    }
}

#[test]
fn every_invalid_manifest_yields_exactly_its_expected_diagnostics() {
    let files = yaml_files(&examples_dir().join("invalid"));
    assert!(files.len() >= 7);
    for file in files {
        let src = std::fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let diags = fleet::load(&src).expect_err(&name);
        assert!(diags.iter().any(|d| d.is_error()), "{name} has no error");
        let rendered: String = diags
            .iter()
            .map(|d| format!("{}\n", d.in_file(&name)))
            .collect();
        expect_test::expect_file![file.with_extension("expected")].assert_eq(&rendered);
    }
}
