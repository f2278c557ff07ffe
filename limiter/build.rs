fn main() {
    // The soname users and tools see (`readelf -d libvcuda.so`).
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libvcuda.so");
}
