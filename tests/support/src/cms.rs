//! Callback packages as Diia sends them, for the relay's tests: CMS `EnvelopedData`
//! addressed to a test acquirer's certificate (the relay checks the recipient; nobody here
//! decrypts, so the payload only has to look encrypted).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use cms::cert::IssuerAndSerialNumber;
use cms::cert::x509::Certificate;
use cms::cert::x509::spki::AlgorithmIdentifierOwned;
use cms::content_info::{CmsVersion, ContentInfo};
use cms::enveloped_data::{
    EncryptedContentInfo, EnvelopedData, KeyTransRecipientInfo, RecipientIdentifier, RecipientInfo,
    RecipientInfos,
};
use der::asn1::{ObjectIdentifier, OctetString, SetOfVec};
use der::{Any, Decode, Encode};

/// Base64 of a DER `ContentInfo(EnvelopedData)` with one key-transport recipient named by
/// `cert_der`'s issuer and serial, around `payload` (encrypted-looking bytes).
pub fn enveloped_for(cert_der: &[u8], payload: &[u8]) -> String {
    let cert = Certificate::from_der(cert_der).expect("test CMS");
    let rid = RecipientIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
        issuer: cert.tbs_certificate.issuer.clone(),
        serial_number: cert.tbs_certificate.serial_number,
    });
    let ktri = KeyTransRecipientInfo {
        version: CmsVersion::V0,
        rid,
        key_enc_alg: AlgorithmIdentifierOwned {
            oid: ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.7"), // RSAES-OAEP
            parameters: None,
        },
        enc_key: OctetString::new(vec![0x5a; 256]).expect("test CMS"),
    };
    let iv = OctetString::new(vec![7u8; 16]).expect("test CMS");
    let enveloped = EnvelopedData {
        version: CmsVersion::V0,
        originator_info: None,
        recip_infos: RecipientInfos(
            SetOfVec::try_from(vec![RecipientInfo::Ktri(ktri)]).expect("test CMS"),
        ),
        encrypted_content: EncryptedContentInfo {
            content_type: ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1"),
            content_enc_alg: AlgorithmIdentifierOwned {
                oid: ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.1.42"), // AES-256-CBC
                parameters: Some(Any::encode_from(&iv).expect("test CMS")),
            },
            encrypted_content: Some(OctetString::new(payload.to_vec()).expect("test CMS")),
        },
        unprotected_attrs: None,
    };
    let info = ContentInfo {
        content_type: ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.3"),
        content: Any::encode_from(&enveloped).expect("test CMS"),
    };
    STANDARD.encode(info.to_der().expect("test CMS"))
}
