//! What every part of a callback must be: base64 text of a DER CMS `ContentInfo` holding
//! an `EnvelopedData` (RFC 5652) with a recipient named by the acquirer's certificate
//! (issuer and serial, in a key-transport or key-agreement recipient). Parsed with
//! RustCrypto's `cms`/`der`; nothing is decrypted.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use cms::cert::IssuerAndSerialNumber;
use cms::content_info::ContentInfo;
use cms::enveloped_data::{
    EnvelopedData, KeyAgreeRecipientIdentifier, RecipientIdentifier, RecipientInfo,
};
use der::asn1::ObjectIdentifier;
use der::{Decode, Encode};

use super::settings::Recipient;

/// `id-envelopedData` (RFC 5652 §6.1).
const ID_ENVELOPED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.3");

/// Why a part is not a package for this acquirer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartError {
    /// Not base64 text.
    NotBase64,
    /// Not a DER `ContentInfo`.
    NotCms,
    /// A `ContentInfo` of another type, or an `EnvelopedData` that does not parse.
    NotEnvelopedData,
    /// No recipient names the acquirer's certificate.
    OtherRecipient,
}

impl PartError {
    /// A short label (metrics, the refusal's code).
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::NotBase64 => "not_base64",
            Self::NotCms => "not_cms",
            Self::NotEnvelopedData => "not_enveloped_data",
            Self::OtherRecipient => "other_recipient",
        }
    }
}

/// Checks one part's text: base64 (line breaks allowed) of a DER `ContentInfo` with an
/// `EnvelopedData` addressed (among others, perhaps) to `recipient`.
pub fn check_part(text: &[u8], recipient: &Recipient) -> Result<(), PartError> {
    let der = decode_base64(text).ok_or(PartError::NotBase64)?;
    let info = ContentInfo::from_der(&der).map_err(|_| PartError::NotCms)?;
    if info.content_type != ID_ENVELOPED_DATA {
        return Err(PartError::NotEnvelopedData);
    }
    let enveloped: EnvelopedData = info
        .content
        .decode_as()
        .map_err(|_| PartError::NotEnvelopedData)?;
    let names = |id: &IssuerAndSerialNumber| {
        id.serial_number.as_bytes() == recipient.serial.as_slice()
            && id
                .issuer
                .to_der()
                .is_ok_and(|issuer| issuer == recipient.issuer_der)
    };
    let addressed = enveloped.recip_infos.0.iter().any(|info| match info {
        RecipientInfo::Ktri(ktri) => match &ktri.rid {
            RecipientIdentifier::IssuerAndSerialNumber(id) => names(id),
            RecipientIdentifier::SubjectKeyIdentifier(_) => false,
        },
        RecipientInfo::Kari(kari) => kari.recipient_enc_keys.iter().any(|key| match &key.rid {
            KeyAgreeRecipientIdentifier::IssuerAndSerialNumber(id) => names(id),
            KeyAgreeRecipientIdentifier::RKeyId(_) => false,
        }),
        RecipientInfo::Kekri(_) | RecipientInfo::Pwri(_) | RecipientInfo::Ori(_) => false,
    });
    if addressed {
        Ok(())
    } else {
        Err(PartError::OtherRecipient)
    }
}

/// Base64 with or without line breaks. Diia's parts are one line, so the text is decoded
/// as it stands first; only text that fails so is decoded again without its whitespace
/// (a byte-by-byte filter was a fifth of the ingest's CPU at 200 KiB).
fn decode_base64(text: &[u8]) -> Option<Vec<u8>> {
    if let Ok(der) = STANDARD.decode(text) {
        return Some(der);
    }
    if !text.iter().any(u8::is_ascii_whitespace) {
        return None;
    }
    let mut compact = Vec::with_capacity(text.len());
    for line in text.split(u8::is_ascii_whitespace) {
        compact.extend_from_slice(line);
    }
    STANDARD.decode(&compact).ok()
}
