//! Which decoder a transfer syntax UID needs.

/// The decoder family of a transfer syntax.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Syntax {
    /// Implicit/explicit little endian, explicit big endian, deflated: the parser already
    /// produced native samples.
    Native,
    /// Encapsulated Uncompressed Explicit VR Little Endian: native bytes in fragments.
    EncapsulatedUncompressed,
    /// RLE Lossless.
    Rle,
    /// JPEG baseline, extended (12-bit), lossless process 14 and SV1.
    Jpeg,
    /// JPEG-LS lossless and near-lossless.
    JpegLs,
    /// JPEG 2000 (Part 1) and HTJ2K (Part 15) codestreams.
    J2k,
    /// Anything else.
    Unknown,
}

impl Syntax {
    /// Family of the transfer syntax `uid`.
    pub(super) fn from_uid(uid: &str) -> Syntax {
        match uid {
            "1.2.840.10008.1.2"
            | "1.2.840.10008.1.2.1"
            | "1.2.840.10008.1.2.2"
            | "1.2.840.10008.1.2.1.99" => Syntax::Native,
            "1.2.840.10008.1.2.1.98" => Syntax::EncapsulatedUncompressed,
            "1.2.840.10008.1.2.5" => Syntax::Rle,
            "1.2.840.10008.1.2.4.50"
            | "1.2.840.10008.1.2.4.51"
            | "1.2.840.10008.1.2.4.57"
            | "1.2.840.10008.1.2.4.70" => Syntax::Jpeg,
            "1.2.840.10008.1.2.4.80" | "1.2.840.10008.1.2.4.81" => Syntax::JpegLs,
            "1.2.840.10008.1.2.4.90"
            | "1.2.840.10008.1.2.4.91"
            | "1.2.840.10008.1.2.4.201"
            | "1.2.840.10008.1.2.4.202"
            | "1.2.840.10008.1.2.4.203" => Syntax::J2k,
            _ => Syntax::Unknown,
        }
    }

    /// Short name for error messages.
    pub(super) fn name(self) -> &'static str {
        match self {
            Syntax::Native => "native",
            Syntax::EncapsulatedUncompressed => "encapsulated uncompressed",
            Syntax::Rle => "RLE",
            Syntax::Jpeg => "JPEG",
            Syntax::JpegLs => "JPEG-LS",
            Syntax::J2k => "JPEG 2000",
            Syntax::Unknown => "unknown",
        }
    }
}
