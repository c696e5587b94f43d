//! Whether a certificate file gives a client what it needs to verify it.
//! A public CA signs server certificates with an intermediate, which the
//! server must send: clients hold only the roots. certbot writes the
//! certificate alone to `cert.pem` and with its intermediate to
//! `fullchain.pem`; serving the first works in a browser that fetches or
//! caches intermediates, and fails in apps, which do not.

use x509_cert::der::oid::db::rfc5280::{ID_AD_CA_ISSUERS, ID_PE_AUTHORITY_INFO_ACCESS};
use x509_cert::der::Decode as _;
use x509_cert::ext::pkix::AuthorityInfoAccessSyntax;
use x509_cert::Certificate;

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
    use x509_cert::der::Encode as _;
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
