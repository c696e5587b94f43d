//! A certificate's validity dates, read from its DER: rustls serves
//! whatever it is given, and an expired certificate fails every client.

use std::time::SystemTime;

use x509_cert::der::Decode as _;
use x509_cert::Certificate;

/// When the certificate `der` is valid, `notBefore` and `notAfter`, or
/// `None` if it is not a DER X.509 certificate.
pub fn validity(der: &[u8]) -> Option<(SystemTime, SystemTime)> {
    let v = Certificate::from_der(der).ok()?.tbs_certificate.validity;
    Some((v.not_before.to_system_time(), v.not_after.to_system_time()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_until(year: i32, month: u8, day: u8) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(year, month, day);
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_not_after_as_utc_time_and_generalized_time() {
        // rcgen writes UTCTime before 2050 and GeneralizedTime from then on.
        for (y, m, d, shown) in [
            (2025, 2, 1, "01 Feb 2025 00:00:00 GMT"),
            (2026, 12, 31, "31 Dec 2026 00:00:00 GMT"),
            (2048, 2, 29, "29 Feb 2048 00:00:00 GMT"),
            (2051, 7, 4, "04 Jul 2051 00:00:00 GMT"),
        ] {
            let (start, at) = validity(&cert_until(y, m, d)).unwrap();
            assert!(httpdate::fmt_http_date(start).ends_with("01 Jan 2020 00:00:00 GMT"));
            let text = httpdate::fmt_http_date(at);
            assert!(text.ends_with(shown), "{text}, not {shown}");
        }
    }

    #[test]
    fn other_bytes_have_no_date() {
        assert_eq!(validity(b""), None);
        assert_eq!(validity(b"-----BEGIN CERTIFICATE-----"), None);
        let der = cert_until(2030, 1, 1);
        assert_eq!(validity(&der[..40]), None);
    }
}
