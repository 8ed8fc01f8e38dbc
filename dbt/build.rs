fn main() {
    println!("cargo:rerun-if-changed=csrc/corpus.c");
    // The C corpus is only for the host harness (feature `host`).
    if std::env::var_os("CARGO_FEATURE_HOST").is_some() {
        cc::Build::new().file("csrc/corpus.c").opt_level(2).flag("-fno-strict-aliasing").compile("dbtcorpus");
    }
}
