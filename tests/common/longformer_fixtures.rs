//! The Hugging Face Longformer golden fixtures (tests/fixtures/longformer, written by
//! scripts/make_longformer_fixtures.py): a `config` line, then named tensors.

use std::path::{Path, PathBuf};

/// One fixture file.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub path: PathBuf,
    pub window: usize,
    pub dilation: usize,
    pub causal: bool,
    pub scale: f32,
    /// (name, shape, values); bools as 0 / 1.
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl Fixture {
    /// The tensor `name`: (shape, values).
    pub fn get(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (_, shape, values) = self
            .tensors
            .iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("{}: no tensor {name}", self.path.display()));
        (shape.clone(), values.clone())
    }

    /// A (B, N) mask tensor as booleans.
    pub fn mask(&self, name: &str) -> (Vec<usize>, Vec<bool>) {
        let (s, v) = self.get(name);
        (s, v.iter().map(|&x| x != 0.0).collect())
    }
}

fn parse(path: &Path) -> Fixture {
    let text = std::fs::read_to_string(path).unwrap();
    let mut config = Vec::new();
    let mut tensors = Vec::new();
    let mut lines = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty());
    while let Some(line) = lines.next() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("config") => {
                for kv in words {
                    let (k, v) = kv.split_once('=').expect("key=value");
                    config.push((k.to_string(), v.to_string()));
                }
            }
            Some("tensor") => {
                let name = words.next().expect("name").to_string();
                let _dtype = words.next().expect("dtype");
                let shape: Vec<usize> = words
                    .next()
                    .expect("shape")
                    .split(',')
                    .map(|x| x.parse().unwrap())
                    .collect();
                let values: Vec<f32> = lines
                    .next()
                    .expect("values line")
                    .split_whitespace()
                    .map(|x| x.parse().unwrap())
                    .collect();
                assert_eq!(values.len(), shape.iter().product::<usize>(), "{name}");
                tensors.push((name, shape, values));
            }
            other => panic!("{}: unexpected line start {other:?}", path.display()),
        }
    }
    let cfg = |k: &str| -> String {
        config
            .iter()
            .find(|(key, _)| key == k)
            .unwrap_or_else(|| panic!("{}: no {k}", path.display()))
            .1
            .clone()
    };
    Fixture {
        path: path.to_path_buf(),
        window: cfg("window").parse().unwrap(),
        dilation: cfg("dilation").parse().unwrap(),
        causal: cfg("causal") != "0",
        scale: cfg("scale").parse().unwrap(),
        tensors,
    }
}

/// Every committed fixture, sorted by file name (at least the 4 committed ones).
pub fn load() -> Vec<Fixture> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/longformer");
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("fixtures at {}: {e}", dir.display()));
    let mut files: Vec<_> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 4,
        "expected the 4 committed fixtures, found {files:?}"
    );
    files.iter().map(|p| parse(p)).collect()
}
