//! A certificate's validity dates, read from its DER: rustls serves
//! whatever it is given, and an expired certificate fails every client.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// When the certificate `der` is valid, `notBefore` and `notAfter`, or
/// `None` if it is not the X.509 shape this reads.
pub fn validity(der: &[u8]) -> Option<(SystemTime, SystemTime)> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version
    // OPTIONAL, serialNumber, signature, issuer, validity SEQUENCE {
    // notBefore, notAfter }, ... }, ... }
    let (cert, _) = element(der, 0x30)?;
    let (mut tbs, _) = element(cert, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = element(tbs, 0xa0)?.1;
    }
    for tag in [0x02, 0x30, 0x30] {
        tbs = element(tbs, tag)?.1;
    }
    let (validity, _) = element(tbs, 0x30)?;
    let (start, rest) = any_time(validity)?;
    Some((start, any_time(rest)?.0))
}

/// The content of the DER element at the start of `input` if its tag is
/// `tag`, and what follows it.
fn element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, input) = input.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, mut input) = input.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || input.len() < n {
            return None;
        }
        let (bytes, rest) = input.split_at(n);
        input = rest;
        bytes.iter().fold(0, |l, &b| (l << 8) | usize::from(b))
    };
    (input.len() >= len).then(|| input.split_at(len))
}

/// A UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) at
/// the start of `input`, and what follows it.
fn any_time(input: &[u8]) -> Option<(SystemTime, &[u8])> {
    let (text, year, rest) = if let Some((t, rest)) = element(input, 0x17) {
        let yy = digits(t.get(..2)?)?;
        (
            t.get(2..)?,
            if yy >= 50 { 1900 + yy } else { 2000 + yy },
            rest,
        )
    } else {
        let (t, rest) = element(input, 0x18)?;
        (t.get(4..)?, digits(t.get(..4)?)?, rest)
    };
    if text.len() != 11 || text[10] != b'Z' {
        return None;
    }
    let [month, day, hour, minute, second] =
        [0, 2, 4, 6, 8].map(|i| digits(&text[i..i + 2]).unwrap_or(99));
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second.min(60);
    Some((UNIX_EPOCH + Duration::from_secs(secs), rest))
}

/// The number written by ASCII digits.
fn digits(text: &[u8]) -> Option<u64> {
    text.iter().try_fold(0, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// Days from 1970-01-01 to the given date (years 1970 on; H. Hinnant's
/// civil-calendar algorithm).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).saturating_sub(719_468)
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
