//! Whether a certificate file gives a client what it needs to verify it.
//! A public CA signs server certificates with an intermediate, which the
//! server must send: clients hold only the roots. certbot writes the
//! certificate alone to `cert.pem` and with its intermediate to
//! `fullchain.pem`; serving the first works in a browser that fetches or
//! caches intermediates, and fails in apps, which do not.
//!
//! Which of the file's certificates a client checks ([`chain`]): the
//! server's, then its issuer's, and so on, up to a certificate the
//! client holds itself. Each must be within its dates: an intermediate
//! that ran out, or whose start is still to come, fails every client as
//! surely as a server certificate out of its dates does.

use std::time::SystemTime;

use rustls::pki_types::CertificateDer;
use x509_cert::der::oid::db::rfc5280::{ID_AD_CA_ISSUERS, ID_PE_AUTHORITY_INFO_ACCESS};
use x509_cert::der::{Decode as _, Encode as _};
use x509_cert::ext::pkix::AuthorityInfoAccessSyntax;
use x509_cert::name::Name;
use x509_cert::Certificate;

/// One certificate of `tls.cert_file`, for what is said of its dates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Its place in the file, 1 for the server's own (the first).
    pub position: usize,
    /// Its subject, as RFC 4514 text (`CN=R11,O=Let's Encrypt,C=US`),
    /// control characters left out, at most 200 characters.
    pub subject: String,
    /// The start of its validity.
    pub not_before: SystemTime,
    /// The end of its validity.
    pub not_after: SystemTime,
}

/// The file's certificates by whether clients check them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// What a client checks: the server's certificate, then the issuer of
    /// each among the file's others (found by name, in any order, as
    /// clients look it up), up to one the client holds itself and so
    /// never takes from the server: a root (its own issuer), or a
    /// certificate named as one of the public roots (Mozilla's, which
    /// `webpki-roots` carries): an intermediate cross-signed by an older
    /// root, which clients that trust the newer root stop before. Empty
    /// when the first certificate cannot be read (no dates to check).
    pub checked: Vec<Link>,
    /// The rest of the file that could be read: served, but not what a
    /// client that has the roots checks.
    pub others: Vec<Link>,
}

impl Chain {
    /// The certificate a client checks that ends first: when the chain
    /// stops working.
    pub fn ends_first(&self) -> Option<&Link> {
        self.checked.iter().min_by_key(|l| l.not_after)
    }
}

/// [`Chain`] of `certs`, the file's certificates, the server's first.
pub fn chain(certs: &[CertificateDer<'_>]) -> Chain {
    let parsed: Vec<Option<Certificate>> = certs
        .iter()
        .map(|c| Certificate::from_der(c).ok())
        .collect();
    let tbs = |i: usize| {
        &parsed[i]
            .as_ref()
            .expect("only parsed ones")
            .tbs_certificate
    };
    let link = |i: usize| {
        let tbs = tbs(i);
        Link {
            position: i + 1,
            subject: tbs
                .subject
                .to_string()
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect(),
            not_before: tbs.validity.not_before.to_system_time(),
            not_after: tbs.validity.not_after.to_system_time(),
        }
    };
    // Going up from the server's certificate, in the order a client does.
    let mut path: Vec<usize> = Vec::new();
    let mut at = parsed.first().and_then(Option::as_ref).map(|_| 0);
    while let Some(i) = at {
        path.push(i);
        let this = tbs(i);
        at = (0..parsed.len())
            .filter(|j| !path.contains(j) && this.issuer != this.subject)
            .find(|&j| {
                parsed[j]
                    .as_ref()
                    .is_some_and(|c| c.tbs_certificate.subject == this.issuer)
            })
            .filter(|&j| tbs(j).issuer != tbs(j).subject && !public_root(&tbs(j).subject));
    }
    Chain {
        checked: path.iter().map(|&i| link(i)).collect(),
        others: (0..parsed.len())
            .filter(|i| parsed[*i].is_some() && !path.contains(i))
            .map(link)
            .collect(),
    }
}

/// Whether `name` is the subject of one of the public roots clients hold.
fn public_root(name: &Name) -> bool {
    // A trust anchor's subject is the name's DER without its SEQUENCE
    // header.
    let Ok(der) = name.to_der() else {
        return false;
    };
    webpki_roots::TLS_SERVER_ROOTS.iter().any(|root| {
        let inner: &[u8] = root.subject.as_ref();
        der.len() > inner.len()
            && der.ends_with(inner)
            && der_header_len(&der) == der.len() - inner.len()
    })
}

/// The length of the tag and length bytes that begin `der`.
fn der_header_len(der: &[u8]) -> usize {
    match der.get(1) {
        Some(&b) if b < 0x80 => 2,
        Some(&b) => 2 + usize::from(b & 0x7f),
        None => der.len(),
    }
}

/// Whether `der`, a certificate served with no other, names its issuer's
/// certificate for fetching (an AIA `caIssuers` URL, which public CAs
/// put in their certificates) and is not its own issuer: the sign of a
/// certificate whose intermediate was left out. A private CA's
/// certificates, signed by the root its clients are given, usually name
/// none, and are not taken for it.
pub fn wants_its_intermediate(der: &[u8]) -> bool {
    let Ok(cert) = Certificate::from_der(der) else {
        return false;
    };
    let tbs = &cert.tbs_certificate;
    if tbs.issuer == tbs.subject {
        return false;
    }
    tbs.extensions
        .iter()
        .flatten()
        .filter(|e| e.extn_id == ID_PE_AUTHORITY_INFO_ACCESS)
        .filter_map(|e| AuthorityInfoAccessSyntax::from_der(e.extn_value.as_bytes()).ok())
        .any(|aia| aia.0.iter().any(|d| d.access_method == ID_AD_CA_ISSUERS))
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_cert::der::asn1::Ia5String;
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::AccessDescription;

    /// The DER of an AIA extension's value naming `url` as `caIssuers`.
    fn aia_ca_issuers(url: &str) -> Vec<u8> {
        AuthorityInfoAccessSyntax(vec![AccessDescription {
            access_method: ID_AD_CA_ISSUERS,
            access_location: GeneralName::UniformResourceIdentifier(Ia5String::new(url).unwrap()),
        }])
        .to_der()
        .unwrap()
    }

    fn ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        (params.self_signed(&key).unwrap(), key)
    }

    fn leaf(issuer: &(rcgen::Certificate, rcgen::KeyPair), aia: bool) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["relay.test".to_owned()]).unwrap();
        if aia {
            params
                .custom_extensions
                .push(rcgen::CustomExtension::from_oid_content(
                    &[1, 3, 6, 1, 5, 5, 7, 1, 1],
                    aia_ca_issuers("http://ca.test/intermediate.der"),
                ));
        }
        params
            .signed_by(&key, &issuer.0, &issuer.1)
            .unwrap()
            .der()
            .to_vec()
    }

    /// A CA certificate named `dn`, signed by `by` (self-signed without),
    /// ending on `until` (rcgen's far default without), with `key`.
    fn ca_named(
        dn: rcgen::DistinguishedName,
        key: rcgen::KeyPair,
        by: Option<&(rcgen::Certificate, rcgen::KeyPair)>,
        until: Option<i32>,
    ) -> (rcgen::Certificate, rcgen::KeyPair) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name = dn;
        if let Some(year) = until {
            params.not_before = rcgen::date_time_ymd(year - 5, 1, 1);
            params.not_after = rcgen::date_time_ymd(year, 1, 1);
        }
        let cert = match by {
            Some((c, k)) => params.signed_by(&key, c, k).unwrap(),
            None => params.self_signed(&key).unwrap(),
        };
        (cert, key)
    }

    fn cn(name: &str) -> rcgen::DistinguishedName {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, name);
        dn
    }

    fn ders(certs: &[&[u8]]) -> Vec<CertificateDer<'static>> {
        certs
            .iter()
            .map(|c| CertificateDer::from(c.to_vec()))
            .collect()
    }

    fn places(links: &[Link]) -> Vec<usize> {
        links.iter().map(|l| l.position).collect()
    }

    #[test]
    fn the_chain_goes_up_by_issuer_to_a_root() {
        let root = ca("Test Root");
        let key = rcgen::KeyPair::generate().unwrap();
        let mid = ca_named(cn("Test Intermediate"), key, Some(&root), Some(2025));
        let server = leaf(&mid, false);
        // In order, with the root: the root is the client's own.
        let c = chain(&ders(&[&server, mid.0.der(), root.0.der()]));
        assert_eq!(places(&c.checked), [1, 2]);
        assert_eq!(places(&c.others), [3]);
        assert_eq!(c.checked[1].subject, "CN=Test Intermediate");
        assert_eq!(
            c.checked[1].not_after,
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_735_689_600)
        );
        assert_eq!(c.ends_first().unwrap().position, 2);
        // Out of order: found by name all the same.
        let c = chain(&ders(&[&server, root.0.der(), mid.0.der()]));
        assert_eq!(places(&c.checked), [1, 3]);
        assert_eq!(places(&c.others), [2]);
        // A self-signed certificate alone, and bytes that are none.
        let c = chain(&ders(&[root.0.der(), b"not a certificate"]));
        assert_eq!(places(&c.checked), [1]);
        assert!(c.others.is_empty());
        assert!(chain(&ders(&[b"junk", root.0.der()])).checked.is_empty());
    }

    #[test]
    fn a_cross_sign_of_a_public_root_is_not_checked() {
        // Named as ISRG Root X1 is in the public roots (PrintableStrings).
        let mut isrg = rcgen::DistinguishedName::new();
        for (ty, v) in [
            (rcgen::DnType::CountryName, "US"),
            (
                rcgen::DnType::OrganizationName,
                "Internet Security Research Group",
            ),
            (rcgen::DnType::CommonName, "ISRG Root X1"),
        ] {
            isrg.push(ty, rcgen::DnValue::PrintableString(v.try_into().unwrap()));
        }
        let old = ca("Old Root");
        let new_key = rcgen::KeyPair::generate().unwrap();
        let new_root = ca_named(isrg.clone(), new_key, None, None);
        let cross_key = rcgen::KeyPair::from_pem(&new_root.1.serialize_pem()).unwrap();
        let cross = ca_named(isrg, cross_key, Some(&old), Some(2024));
        let mid_key = rcgen::KeyPair::generate().unwrap();
        let mid = ca_named(cn("Test Intermediate"), mid_key, Some(&new_root), None);
        let server = leaf(&mid, false);
        let c = chain(&ders(&[&server, mid.0.der(), cross.0.der()]));
        assert_eq!(places(&c.checked), [1, 2]);
        assert_eq!(places(&c.others), [3]);
        assert_eq!(
            c.others[0].subject,
            "CN=ISRG Root X1,O=Internet Security Research Group,C=US"
        );
        // The same cross-sign under a name no public root has is checked.
        let key = rcgen::KeyPair::generate().unwrap();
        let private_new = ca_named(cn("Private Root"), key, None, None);
        let key = rcgen::KeyPair::from_pem(&private_new.1.serialize_pem()).unwrap();
        let private_cross = ca_named(cn("Private Root"), key, Some(&old), Some(2024));
        let mid_key = rcgen::KeyPair::generate().unwrap();
        let mid = ca_named(cn("Test Intermediate"), mid_key, Some(&private_new), None);
        let server = leaf(&mid, false);
        let c = chain(&ders(&[&server, mid.0.der(), private_cross.0.der()]));
        assert_eq!(places(&c.checked), [1, 2, 3]);
    }

    #[test]
    fn a_certificate_naming_its_issuer_for_fetching_wants_it_sent() {
        let intermediate = ca("Test Intermediate");
        assert!(wants_its_intermediate(&leaf(&intermediate, true)));
        // A private CA's certificate that names nothing to fetch.
        assert!(!wants_its_intermediate(&leaf(&intermediate, false)));
        // Its own issuer: nothing to send with it.
        assert!(!wants_its_intermediate(intermediate.0.der()));
        assert!(!wants_its_intermediate(b"not a certificate"));
    }
}
