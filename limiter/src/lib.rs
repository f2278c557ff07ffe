//! libvcuda.so (skeleton).
