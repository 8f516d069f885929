//! The protobuf codec every generated client and server uses: prost's, except that a message
//! that cannot be decoded is INVALID_ARGUMENT, not INTERNAL.
//!
//! tonic-prost maps every decode error to INTERNAL, which tells a client "the server is
//! broken" when the client sent truncated or garbage bytes. The coordinator faces untrusted
//! callers, and clients branch on codes: bad bytes are the caller's fault, so they get the
//! caller's-fault code. `build.rs` points the generated code here through `codec_path`.

use prost::Message;
use tonic::{
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
    Code, Status,
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] with decode errors answered INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct FleetmarkCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for FleetmarkCodec<T, U> {
    fn default() -> Self {
        FleetmarkCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for FleetmarkCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = FleetmarkDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        FleetmarkDecoder(self.0.decoder())
    }
}

/// Decodes like [`ProstDecoder`], reporting undecodable bytes as INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct FleetmarkDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for FleetmarkDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| {
            if s.code() == Code::Internal {
                Status::invalid_argument(format!("undecodable message: {}", s.message()))
            } else {
                s
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
