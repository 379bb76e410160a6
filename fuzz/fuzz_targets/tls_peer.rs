//! What the agent reads of a TLS peer and of a server's login: TLS records
//! from an application whose TLS the agent terminates (the relay's layer,
//! fed in chunks the input chooses, sealing between), a certificate's
//! subject and signature hash (a `require`-mode server's certificate is
//! anything), and SCRAM server messages. Every run ends without a panic
//! or a hang.
#![no_main]

use std::sync::{Arc, LazyLock};

use bytes::BytesMut;
use interceptor::{
    credential::{Keys, Scram},
    tls,
};
use interceptor_relay::Layer as _;
use libfuzzer_sys::fuzz_target;

static SERVER: LazyLock<Arc<rustls::ServerConfig>> = LazyLock::new(|| {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["db.test".into()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
    Arc::new(config)
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let conn = rustls::ServerConnection::new(SERVER.clone()).unwrap();
            let mut layer = tls::Layer(conn.into());
            let (mut plain, mut reply) = (BytesMut::new(), BytesMut::new());
            for chunk in rest.chunks(rest.first().map_or(1, |&b| b as usize + 1)) {
                let mut wire = BytesMut::from(chunk);
                if layer.open(&mut wire, &mut plain, &mut reply).is_err() {
                    break;
                }
                assert!(wire.is_empty(), "the layer takes all it is given");
                let mut out = BytesMut::from(&b"hello"[..]);
                let _ = layer.seal(&mut out, &mut reply);
            }
            layer.close(&mut reply);
        }
        1 => {
            let mut s = Scram::new(None, false);
            let keys = Keys::Password(b"secret".to_vec());
            let _ = s.answer(rest, &keys);
            let _ = s.verify(rest);
        }
        _ => {
            let _ = tls::der::subject(rest).map(|n| n.to_string());
            let _ = tls::server_end_point(rest);
        }
    }
});
