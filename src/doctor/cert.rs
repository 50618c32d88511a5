//! Certificates as `doctor` judges them: does a chain verify for a name
//! against the trusted roots, how long until it expires, and does it match
//! a TLSA record (RFC 6698, RFC 7671). Pure functions over DER bytes.

use std::path::Path;
use std::sync::Arc;

use hickory_resolver::proto::rr::rdata::TLSA;
use ring::digest;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, Error as TlsError};

/// The certificates of a PEM file, leaf first.
pub fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(chain)
}

/// Whether `chain` (leaf first) is what a verifying sender accepts for
/// `name` now: it chains to a trusted root, names `name`, and is in its
/// validity period. The error says which of these is wrong.
pub fn verify(
    verifier: &Arc<WebPkiServerVerifier>,
    chain: &[CertificateDer<'static>],
    name: &str,
) -> Result<(), String> {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err("no certificate".into());
    };
    let server_name = ServerName::try_from(name.trim_end_matches('.').to_owned())
        .map_err(|e| format!("{name:?} is not a name a certificate can carry: {e}"))?;
    verifier
        .verify_server_cert(leaf, intermediates, &server_name, &[], UnixTime::now())
        .map(|_| ())
        .map_err(|e| explain(&e, name))
}

fn explain(error: &TlsError, name: &str) -> String {
    match error {
        TlsError::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!("not valid for {name}"),
        TlsError::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired".into(),
        TlsError::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "not valid yet".into(),
        TlsError::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "does not chain to a trusted root (intermediate certificates missing, \
             or a CA senders do not trust)"
                .into()
        }
        other => other.to_string(),
    }
}

/// The leaf's notAfter, in seconds since the Unix epoch.
pub fn not_after(leaf: &CertificateDer<'_>) -> Result<i64, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    Ok(cert.validity().not_after.timestamp())
}

/// Whether `record` matches `chain` (leaf first) as a sender checks it
/// (RFC 7671): usages 1 and 3 name the leaf, 0 and 2 a trust anchor, which
/// must then be in the chain the server sends.
pub fn tlsa_matches(record: &TLSA, chain: &[CertificateDer<'_>]) -> bool {
    let candidates: &[CertificateDer<'_>] = match u8::from(record.cert_usage) {
        1 | 3 => &chain[..chain.len().min(1)],
        0 | 2 => chain.get(1..).unwrap_or(&[]),
        _ => return false,
    };
    candidates.iter().any(|cert| {
        let Some(selected) = select(u8::from(record.selector), cert) else {
            return false;
        };
        match u8::from(record.matching) {
            0 => selected == record.cert_data,
            1 => digest::digest(&digest::SHA256, &selected).as_ref() == record.cert_data,
            2 => digest::digest(&digest::SHA512, &selected).as_ref() == record.cert_data,
            _ => false,
        }
    })
}

/// Selector 0: the whole certificate; 1: its SubjectPublicKeyInfo.
fn select(selector: u8, cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    match selector {
        0 => Some(cert.as_ref().to_vec()),
        1 => {
            let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
            Some(parsed.tbs_certificate.subject_pki.raw.to_vec())
        }
        _ => None,
    }
}

/// A TLSA record in presentation form, for messages: `3 1 1 ab12…`.
pub fn tlsa_text(record: &TLSA) -> String {
    format!(
        "{} {} {} {}",
        u8::from(record.cert_usage),
        u8::from(record.selector),
        u8::from(record.matching),
        hex(&record.cert_data)
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The record a sender would match for `leaf` (usage 3, SPKI, SHA-256: the
/// form that survives renewals with the same key), for a fix to suggest.
pub fn suggested_tlsa(leaf: &CertificateDer<'_>) -> Option<String> {
    let spki = select(1, leaf)?;
    Some(format!(
        "3 1 1 {}",
        hex(digest::digest(&digest::SHA256, &spki).as_ref())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::rr::rdata::tlsa::{CertUsage, Matching, Selector};

    fn chain() -> (Vec<CertificateDer<'static>>, Vec<u8>) {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, PublicKeyData,
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["mx2.example.net".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (
            vec![leaf.der().clone(), ca.der().clone()],
            key.subject_public_key_info(),
        )
    }

    fn record(usage: u8, selector: u8, matching: u8, data: Vec<u8>) -> TLSA {
        TLSA::new(
            CertUsage::from(usage),
            Selector::from(selector),
            Matching::from(matching),
            data,
        )
    }

    #[test]
    fn tlsa_usages_selectors_and_matching_types() {
        let (chain, spki) = chain();
        let sha256 = |b: &[u8]| digest::digest(&digest::SHA256, b).as_ref().to_vec();
        let sha512 = |b: &[u8]| digest::digest(&digest::SHA512, b).as_ref().to_vec();
        // The leaf, by its key or by the whole certificate.
        assert!(tlsa_matches(&record(3, 1, 1, sha256(&spki)), &chain));
        assert!(tlsa_matches(&record(3, 1, 2, sha512(&spki)), &chain));
        assert!(tlsa_matches(&record(3, 1, 0, spki.clone()), &chain));
        assert!(tlsa_matches(&record(3, 0, 1, sha256(&chain[0])), &chain));
        assert!(tlsa_matches(&record(1, 0, 1, sha256(&chain[0])), &chain));
        // A trust anchor record names the CA, never the leaf.
        assert!(tlsa_matches(&record(2, 0, 1, sha256(&chain[1])), &chain));
        assert!(!tlsa_matches(&record(2, 0, 1, sha256(&chain[0])), &chain));
        assert!(!tlsa_matches(&record(3, 0, 1, sha256(&chain[1])), &chain));
        // ... and it must be in the chain the server sends.
        assert!(!tlsa_matches(
            &record(2, 0, 1, sha256(&chain[1])),
            &chain[..1]
        ));
        // Wrong data, unknown usage/selector/matching.
        assert!(!tlsa_matches(&record(3, 1, 1, vec![0; 32]), &chain));
        assert!(!tlsa_matches(&record(4, 1, 1, sha256(&spki)), &chain));
        assert!(!tlsa_matches(&record(3, 2, 1, sha256(&spki)), &chain));
        assert!(!tlsa_matches(&record(3, 1, 3, sha256(&spki)), &chain));
        // What doctor suggests matches.
        let suggested = suggested_tlsa(&chain[0]).unwrap();
        assert_eq!(
            suggested,
            tlsa_text(&record(3, 1, 1, sha256(&spki))),
            "suggested record"
        );
    }

    #[test]
    fn not_after_is_read_from_the_leaf() {
        let (chain, _) = chain();
        // rcgen's default validity ends in 4096.
        let end = not_after(&chain[0]).unwrap();
        assert!(end > 4_000_000_000, "{end}");
        assert!(not_after(&CertificateDer::from(vec![1, 2, 3])).is_err());
    }
}
