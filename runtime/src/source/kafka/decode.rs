//! A record's headers, read without trusting their bytes.
//!
//! Kafka header names are arbitrary bytes on the wire; rdkafka's
//! [`Headers`](rdkafka::message::Headers) accessors turn each name into a
//! `&str` with an `unwrap`, so a producer that sends a name that is not
//! UTF-8 would panic the consumer task on every delivery of that record.
//! Headers are therefore read here through librdkafka's own accessor:
//!
//! Invariant: nothing a producer sends can make reading a record panic. A
//! name that is not UTF-8 is kept with each invalid sequence replaced by
//! U+FFFD (a Weir header name is text); a value is kept byte for byte; a
//! header without a value has empty bytes.

use std::ffi::CStr;

use rdkafka::bindings as rdsys;
use rdkafka::message::{BorrowedHeaders, BorrowedMessage, Message as _};

/// `record`'s headers, in order.
pub fn headers_of(record: &BorrowedMessage<'_>) -> Vec<(String, Vec<u8>)> {
    record.headers().map(read).unwrap_or_default()
}

#[allow(unsafe_code)]
fn read(headers: &BorrowedHeaders) -> Vec<(String, Vec<u8>)> {
    // `BorrowedHeaders` is librdkafka's `rd_kafka_headers_t`, borrowed for
    // as long as the record (rdkafka's own accessors cast it the same way).
    let native = std::ptr::from_ref(headers).cast::<rdsys::rd_kafka_headers_t>();
    // SAFETY: `native` is a live header list for the lifetime of `headers`.
    let count = unsafe { rdsys::rd_kafka_header_cnt(native) };
    let mut out = Vec::with_capacity(count);
    for index in 0..count {
        let mut name: *const std::ffi::c_char = std::ptr::null();
        let mut value: *const std::ffi::c_void = std::ptr::null();
        let mut size: usize = 0;
        // SAFETY: `index < count`; the out-pointers are valid locals.
        let err = unsafe {
            rdsys::rd_kafka_header_get_all(native, index, &mut name, &mut value, &mut size)
        };
        if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        // SAFETY: librdkafka keeps every name NUL-terminated, and `value`
        // (when not null) points at `size` bytes, both owned by the list.
        let (name, value) = unsafe {
            (
                CStr::from_ptr(name).to_bytes(),
                if value.is_null() {
                    &[][..]
                } else {
                    std::slice::from_raw_parts(value.cast::<u8>(), size)
                },
            )
        };
        out.push((String::from_utf8_lossy(name).into_owned(), value.to_vec()));
    }
    out
}
