//! Replays the fuzz corpus (`fuzz/corpus/decode`) and 50,000 deterministic random inputs through
//! the decoder: none may panic. The coverage-guided run is `cargo fuzz run decode` (BENCHMARKS.md).

use std::path::Path;

#[test]
fn corpus_and_random_inputs_never_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/decode");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("the fuzz corpus") {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        portres_proto::fuzz_decode(&data);
        files += 1;
    }
    assert!(files >= 8, "corpus has {files} files");

    // Random mutations of the corpus seeds and plain random bytes (xorshift, fixed seed).
    let seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..50_000 {
        let mut data = if i % 2 == 0 {
            seeds[(next() as usize) % seeds.len()].clone()
        } else {
            (0..next() % 200).map(|_| next() as u8).collect()
        };
        for _ in 0..(next() % 8) {
            if data.is_empty() {
                break;
            }
            let at = (next() as usize) % data.len();
            data[at] = next() as u8;
        }
        portres_proto::fuzz_decode(&data);
    }
}
