//! herald-bench: see crates/herald-bench/README (to be written).

fn main() {}
