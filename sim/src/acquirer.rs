//! The acquirer's encryption certificate, and CMS `EnvelopedData` addressed to it.
//!
//! Diia encrypts every document package to the acquirer's certificate (the recipient named
//! by issuer + serial number). The simulator does the same with RustCrypto's `cms` builder:
//! key transport (RSA PKCS #1 v1.5) of an AES-256-CBC content key. Diia signs before it
//! encrypts (CAdES with Ukrainian algorithms); the simulator skips the signature, which a
//! relay that never decrypts cannot see anyway.

use cms::builder::{
    ContentEncryptionAlgorithm, EnvelopedDataBuilder, KeyEncryptionInfo,
    KeyTransRecipientInfoBuilder,
};
use cms::cert::IssuerAndSerialNumber;
use cms::content_info::ContentInfo;
use cms::enveloped_data::RecipientIdentifier;
use rsa::pkcs8::{DecodePublicKey, EncodePrivateKey, LineEnding};
use rsa::rand_core::OsRng;
use rsa::{RsaPrivateKey, RsaPublicKey};
use x509_cert::Certificate;
use x509_cert::der::oid::db::rfc5911::ID_ENVELOPED_DATA;
use x509_cert::der::{Any, DecodePem, Encode};

/// RSA modulus size of a generated test key.
const GENERATED_KEY_BITS: usize = 2048;

/// The acquirer's encryption certificate: who packages are addressed to.
#[derive(Debug, Clone)]
pub struct AcquirerCertificate {
    pem: String,
    private_key_pem: Option<String>,
    recipient: IssuerAndSerialNumber,
    public_key: RsaPublicKey,
}

impl AcquirerCertificate {
    /// A fresh RSA key and a self-signed certificate for it (rcgen). Slow in debug builds
    /// (RSA key generation): call it off the async threads.
    pub fn generate() -> Result<Self, String> {
        let key = RsaPrivateKey::new(&mut OsRng, GENERATED_KEY_BITS)
            .map_err(|e| format!("RSA key generation: {e}"))?;
        let private_key_pem = key
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| format!("RSA key encoding: {e}"))?
            .to_string();
        let pair =
            rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(&private_key_pem, &rcgen::PKCS_RSA_SHA256)
                .map_err(|e| format!("RSA key for rcgen: {e}"))?;
        let mut params = rcgen::CertificateParams::new(vec!["acquirer.diia-sim.invalid".into()])
            .map_err(|e| format!("certificate parameters: {e}"))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "diia-sim test acquirer");
        let certificate = params
            .self_signed(&pair)
            .map_err(|e| format!("self-signing: {e}"))?;
        let mut loaded = Self::from_pem(&certificate.pem())?;
        loaded.private_key_pem = Some(private_key_pem);
        Ok(loaded)
    }

    /// Reads a PEM certificate whose subject key is RSA (the only key transport the
    /// `cms` builder offers).
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        let certificate = Certificate::from_pem(pem.as_bytes())
            .map_err(|e| format!("not a PEM X.509 certificate: {e}"))?;
        let tbs = &certificate.tbs_certificate;
        let spki = tbs
            .subject_public_key_info
            .to_der()
            .map_err(|e| format!("certificate key: {e}"))?;
        let public_key = RsaPublicKey::from_public_key_der(&spki)
            .map_err(|e| format!("the certificate's key is not RSA: {e}"))?;
        Ok(Self {
            pem: pem.to_owned(),
            private_key_pem: None,
            recipient: IssuerAndSerialNumber {
                issuer: tbs.issuer.clone(),
                serial_number: tbs.serial_number.clone(),
            },
            public_key,
        })
    }

    /// The certificate, PEM (what a gateway's `recipient_cert_file` holds).
    #[must_use]
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The private key (PKCS #8 PEM) of a generated certificate; `None` for a loaded one.
    /// For tests that decrypt what the simulator sent, never served over HTTP.
    #[must_use]
    pub fn private_key_pem(&self) -> Option<&str> {
        self.private_key_pem.as_deref()
    }

    /// Issuer and serial number: how a package names its recipient.
    #[must_use]
    pub fn recipient(&self) -> &IssuerAndSerialNumber {
        &self.recipient
    }

    /// DER `ContentInfo(EnvelopedData)` of `content`, addressed to this certificate.
    pub fn envelope(&self, content: &[u8]) -> Result<Vec<u8>, String> {
        let fail = |e: cms::builder::Error| format!("CMS EnvelopedData: {e:?}");
        let mut key_rng = OsRng;
        let recipient = KeyTransRecipientInfoBuilder::new(
            RecipientIdentifier::IssuerAndSerialNumber(self.recipient.clone()),
            KeyEncryptionInfo::Rsa(self.public_key.clone()),
            &mut key_rng,
        )
        .map_err(fail)?;
        let mut builder =
            EnvelopedDataBuilder::new(None, content, ContentEncryptionAlgorithm::Aes256Cbc, None)
                .map_err(fail)?;
        let enveloped = builder
            .add_recipient_info(recipient)
            .map_err(fail)?
            .build_with_rng(&mut OsRng)
            .map_err(fail)?;
        let info = ContentInfo {
            content_type: ID_ENVELOPED_DATA,
            content: Any::encode_from(&enveloped).map_err(|e| format!("DER: {e}"))?,
        };
        info.to_der().map_err(|e| format!("DER: {e}"))
    }
}
