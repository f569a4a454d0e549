//! A pre-parse check of a DICOM byte stream: every declared value length must fit in the
//! bytes that enclose it.
//!
//! dicom-object reserves and zero-fills an element's declared length before reading it,
//! so a 60 kB request whose header claims a 1 GB value would make the daemon allocate
//! and touch 1 GB. Walking the element headers first (no values are decoded) bounds every
//! allocation the parser makes by the size of the request.

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;

use super::DecodeError;

const UNDEFINED: u32 = 0xFFFF_FFFF;
/// Deflated Explicit VR Little Endian: the one syntax whose data set this check inflates
/// (and hands to the parser inflated, see `dicom::read`).
pub(crate) const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
const PIXEL_DATA: (u16, u16) = (0x7FE0, 0x0010);
/// Nesting deeper than this is refused (it is only ever seen in crafted files).
const MAX_DEPTH: usize = 64;

#[derive(Clone, Copy)]
struct Encoding {
    explicit: bool,
    big_endian: bool,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    enc: Encoding,
}

fn invalid(what: String) -> DecodeError {
    DecodeError::Invalid(format!("malformed DICOM: {what}"))
}

impl Reader<'_> {
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self
            .buf
            .get(self.pos..self.pos + 2)
            .ok_or_else(|| invalid(format!("truncated element header at byte {}", self.pos)))?;
        self.pos += 2;
        Ok(if self.enc.big_endian {
            u16::from_be_bytes([b[0], b[1]])
        } else {
            u16::from_le_bytes([b[0], b[1]])
        })
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self
            .buf
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| invalid(format!("truncated element header at byte {}", self.pos)))?;
        self.pos += 4;
        Ok(if self.enc.big_endian {
            u32::from_be_bytes([b[0], b[1], b[2], b[3]])
        } else {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        })
    }

    /// Skips `len` bytes of value, refusing a length past the end.
    fn skip(&mut self, len: u32, tag: (u16, u16)) -> Result<(), DecodeError> {
        let left = self.buf.len() - self.pos;
        if len as usize > left {
            return Err(invalid(format!(
                "element ({:04X},{:04X}) declares {len} bytes but only {left} remain",
                tag.0, tag.1
            )));
        }
        self.pos += len as usize;
        Ok(())
    }

    /// Walks elements until the end of the buffer or a delimiter closing this level.
    fn walk(&mut self, depth: usize) -> Result<(), DecodeError> {
        if depth > MAX_DEPTH {
            return Err(invalid("sequences nest too deeply".into()));
        }
        while self.pos < self.buf.len() {
            let tag = (self.u16()?, self.u16()?);
            if tag.0 == 0xFFFE {
                let len = self.u32()?;
                match tag.1 {
                    // Item or sequence delimiter: this level ends. Its length is 0 (PS3.5
                    // 7.5); where a broken item leaves the parser reading one as a value,
                    // it reserves that length first.
                    0xE00D | 0xE0DD if len != 0 => {
                        return Err(invalid(format!(
                            "delimiter (FFFE,{:04X}) has length {len}, not 0",
                            tag.1
                        )));
                    }
                    0xE00D | 0xE0DD => return Ok(()),
                    0xE000 if len == UNDEFINED => self.walk(depth + 1)?,
                    0xE000 => self.nested(len, tag, depth)?,
                    _ => return Err(invalid(format!("unknown item tag (FFFE,{:04X})", tag.1))),
                }
                continue;
            }
            let (vr, len) = self.header(tag)?;
            if let Some(size) = vr.and_then(value_size)
                && len != UNDEFINED
                && len % size != 0
            {
                return Err(invalid(format!(
                    "element ({:04X},{:04X}) has VR {} but a length of {len}, not a multiple of {size}",
                    tag.0,
                    tag.1,
                    vr.map_or("?", |v| v.to_string())
                )));
            }
            if len == UNDEFINED {
                if tag == PIXEL_DATA {
                    self.fragments()?;
                } else {
                    // A sequence (or any undefined-length element, which the parser reads
                    // as one, in the data set's own encoding): items follow inline.
                    self.walk(depth + 1)?;
                }
            } else if vr == Some(VR::SQ) {
                self.nested(len, tag, depth)?;
            } else {
                self.skip(len, tag)?;
            }
        }
        Ok(())
    }

    /// A defined-length sequence or item: its content must fit in it.
    fn nested(&mut self, len: u32, tag: (u16, u16), depth: usize) -> Result<(), DecodeError> {
        let start = self.pos;
        self.skip(len, tag)?;
        let mut inner = Reader {
            buf: &self.buf[start..self.pos],
            pos: 0,
            enc: self.enc,
        };
        inner.walk(depth + 1)
    }

    /// Encapsulated pixel data: items of raw bytes up to the sequence delimiter.
    fn fragments(&mut self) -> Result<(), DecodeError> {
        loop {
            let tag = (self.u16()?, self.u16()?);
            let len = self.u32()?;
            match tag {
                (0xFFFE, 0xE0DD) => return Ok(()),
                (0xFFFE, 0xE000) if len != UNDEFINED => self.skip(len, tag)?,
                _ => {
                    return Err(invalid(format!(
                        "unexpected ({:04X},{:04X}) among pixel data fragments",
                        tag.0, tag.1
                    )));
                }
            }
            if self.pos >= self.buf.len() {
                // A missing final delimiter: every fragment is complete, let it parse.
                return Ok(());
            }
        }
    }

    /// VR (when known) and length of a data element header.
    fn header(&mut self, tag: (u16, u16)) -> Result<(Option<VR>, u32), DecodeError> {
        if self.enc.explicit {
            let b = self
                .buf
                .get(self.pos..self.pos + 2)
                .ok_or_else(|| invalid(format!("truncated element header at byte {}", self.pos)))?;
            self.pos += 2;
            // An unknown VR leaves the header's size ambiguous (readers disagree on it).
            let vr = Some(VR::from_binary([b[0], b[1]]).ok_or_else(|| {
                invalid(format!(
                    "element ({:04X},{:04X}) has an unknown VR {:?}",
                    tag.0,
                    tag.1,
                    String::from_utf8_lossy(b)
                ))
            })?);
            let long = matches!(
                vr,
                Some(
                    VR::OB
                        | VR::OD
                        | VR::OF
                        | VR::OL
                        | VR::OV
                        | VR::OW
                        | VR::SQ
                        | VR::SV
                        | VR::UC
                        | VR::UN
                        | VR::UR
                        | VR::UT
                        | VR::UV
                )
            );
            if long {
                self.pos += 2; // reserved
                Ok((vr, self.u32()?))
            } else {
                Ok((vr, u32::from(self.u16()?)))
            }
        } else {
            let len = self.u32()?;
            // The parser reads an implicit VR element by its dictionary VR.
            let vr = match StandardDataDictionary
                .by_tag(Tag(tag.0, tag.1))
                .map(|e| e.vr())
            {
                Some(VirtualVr::Exact(vr)) => Some(vr),
                _ => None,
            };
            Ok((vr, len))
        }
    }
}

/// Bytes per value of the VRs the parser reads as whole binary numbers. It reads
/// length / size values and then counts the whole length as read, so a length that is not
/// a multiple leaves bytes behind and the next header is read from inside a value: a
/// 10 kB file then "declared" a 4 GB element, which the parser reserved (found by
/// tests/fuzz_decode.rs).
fn value_size(vr: VR) -> Option<u32> {
    match vr {
        VR::US | VR::SS | VR::OW => Some(2),
        VR::UL | VR::SL | VR::FL | VR::AT | VR::OF | VR::OL => Some(4),
        VR::FD | VR::OD | VR::SV | VR::UV | VR::OV => Some(8),
        _ => None,
    }
}

/// Deflated data sets are inflated (to a bounded size) and walked like explicit VR little
/// endian ones, since that is what they are once inflated. The inflated bytes are returned
/// so that the parser reads them instead of inflating a second time.
fn inflate_and_check(compressed: &[u8]) -> Result<Vec<u8>, DecodeError> {
    use std::io::Read;
    const MAX_INFLATED: u64 = 1 << 30;
    let mut inflated = Vec::new();
    flate2::read::DeflateDecoder::new(compressed)
        .take(MAX_INFLATED + 1)
        .read_to_end(&mut inflated)
        .map_err(|e| invalid(format!("deflated data set does not inflate: {e}")))?;
    if inflated.len() as u64 > MAX_INFLATED {
        return Err(DecodeError::TooLarge(format!(
            "deflated data set inflates past {MAX_INFLATED} bytes"
        )));
    }
    let mut data = Reader {
        buf: &inflated,
        pos: 0,
        enc: Encoding {
            explicit: true,
            big_endian: false,
        },
    };
    while data.pos < data.buf.len() {
        data.walk(0)?;
    }
    Ok(inflated)
}

/// A Part 10 body whose declared lengths all fit.
pub enum Checked<'a> {
    /// The body as received.
    Plain(&'a [u8]),
    /// A deflated data set, inflated once here: the file meta group as received, then the
    /// data set's explicit VR little endian bytes.
    Inflated {
        /// "DICM" and the file meta group.
        meta: &'a [u8],
        /// The inflated data set.
        data_set: Vec<u8>,
    },
}

/// Checks the declared lengths of a Part 10 body (starting at "DICM"). A deflated data set
/// is inflated and checked in its inflated form.
pub fn check_lengths(body: &[u8]) -> Result<Checked<'_>, DecodeError> {
    let meta_enc = Encoding {
        explicit: true,
        big_endian: false,
    };
    let mut meta = Reader {
        buf: body,
        pos: 4,
        enc: meta_enc,
    };
    let mut ts = String::new();
    // File meta group (0002,xxxx): always explicit VR little endian. Its end is where the
    // group length (0002,0000) says, which is how the parser finds the data set; the parser
    // reads every element up to there, whatever its tag (a stray (8902,0003) included), and
    // reserves each meta value's length before reading it, so each one is checked here.
    let mut meta_end = None;
    while meta.pos + 4 <= body.len()
        && match meta_end {
            Some(end) => meta.pos < end,
            None => u16::from_le_bytes([body[meta.pos], body[meta.pos + 1]]) == 0x0002,
        }
    {
        let tag = (meta.u16()?, meta.u16()?);
        let (_, len) = meta.header(tag)?;
        let start = meta.pos;
        meta.skip(len, tag)?;
        if let Some(end) = meta_end
            && meta.pos > end
        {
            return Err(invalid(format!(
                "file meta element (0002,{:04X}) runs past the group length",
                tag.1
            )));
        }
        let value = &body[start..meta.pos];
        match tag {
            (0x0002, 0x0000) if value.len() == 4 => {
                let group = u32::from_le_bytes([value[0], value[1], value[2], value[3]]) as usize;
                if meta.pos + group > body.len() {
                    return Err(invalid(format!(
                        "file meta group length {group} runs past the end of the file"
                    )));
                }
                meta_end = Some(meta.pos + group);
            }
            (0x0002, 0x0010) => {
                ts = String::from_utf8_lossy(value)
                    .trim_end_matches(['\0', ' '])
                    .to_string();
            }
            _ => {}
        }
    }
    if let Some(end) = meta_end {
        meta.pos = end;
    }
    let enc = match ts.as_str() {
        "1.2.840.10008.1.2" => Encoding {
            explicit: false,
            big_endian: false,
        },
        "1.2.840.10008.1.2.2" => Encoding {
            explicit: true,
            big_endian: true,
        },
        DEFLATED => {
            return Ok(Checked::Inflated {
                meta: &body[..meta.pos],
                data_set: inflate_and_check(&body[meta.pos..])?,
            });
        }
        _ => meta_enc,
    };
    let mut data = Reader {
        buf: &body[meta.pos..],
        pos: 0,
        enc,
    };
    // A stray delimiter ends a level early; keep checking what follows it.
    while data.pos < data.buf.len() {
        data.walk(0)?;
    }
    Ok(Checked::Plain(body))
}
