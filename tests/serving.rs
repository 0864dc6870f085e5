//! How the server listens: TLS, plaintext only on loopback unless allowed,
//! host names, serve as the default command, and the per-connection cap on
//! concurrent streams.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Command, Stdio},
};

use runledger::{App, Config, StartError};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::helpers::*;

#[tokio::test]
async fn with_tls_clients_that_trust_the_certificate_are_served_and_plaintext_is_not() {
    let storage = Storage::fresh().await;
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_path, key_path) = (
        storage.path().join("cert.pem"),
        storage.path().join("key.pem"),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, signing_key.serialize_pem()).unwrap();
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), storage.database()).unwrap();
    config.tls_cert = Some(cert_path);
    config.tls_key = Some(key_path);
    let app = App::build(config).await.expect("starts with TLS");
    let addr = app.local_addr();
    let shutdown = app.shutdown_token();
    let server = tokio::spawn(app.run_until_stopped());

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(cert.pem()))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("a TLS connection");
    let e = ExecutionServiceClient::new(channel)
        .create_execution(goal("over TLS"))
        .await
        .expect("served over TLS")
        .into_inner();
    assert!(e.created);

    let plaintext = match Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
    {
        Err(e) => Err(e.to_string()),
        Ok(channel) => ExecutionServiceClient::new(channel)
            .create_execution(goal("in the clear"))
            .await
            .map(drop)
            .map_err(|s| s.to_string()),
    };
    assert!(plaintext.is_err(), "a plaintext call was served");

    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn without_tls_a_non_loopback_address_is_refused_unless_plaintext_is_allowed() {
    let storage = Storage::fresh().await;
    // 0.0.0.0 only to see the refusal: the check comes before any bind.
    let config = Config::new("0.0.0.0:0".parse().unwrap(), storage.database()).unwrap();
    match App::build(config).await {
        Err(e @ StartError::Plaintext(_)) => {
            let message = e.to_string();
            for part in [
                "TLS",
                "API keys travel in headers",
                "--tls-cert",
                "--allow-plaintext",
            ] {
                assert!(message.contains(part), "{message}");
            }
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        storage.untouched().await,
        "refused before the database was opened"
    );

    // A certificate that is not one stops the start and says so.
    let garbage = storage.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), storage.database()).unwrap();
    config.tls_cert = Some(garbage.clone());
    config.tls_key = Some(garbage);
    match App::build(config).await {
        Err(e @ StartError::Tls(_)) => {
            assert!(e.to_string().contains("private key"), "{e}")
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
    assert!(
        storage.untouched().await,
        "refused before the database was opened"
    );
    // Served, the same database is set up.
    let app = spawn_in(storage, |_| {}).await;
    assert!(!app.storage.untouched().await);
    app.stop().await;
}

#[tokio::test]
async fn runledger_without_a_command_serves_on_a_host_name() {
    let storage = Storage::fresh().await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_runledger"))
        .args(["--listen", "localhost:0", "--database"])
        .arg(storage.database())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    let addr: SocketAddr = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            panic!("exited without listening: {log:#?}");
        };
        if let Some(rest) = line.split("addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
        log.push(line);
    };
    std::thread::spawn(move || for _ in lines {});
    assert!(addr.ip().is_loopback(), "{addr}");
    // Served open: localhost counts as loopback.
    let channel = connect(addr).await;
    ExecutionServiceClient::new(channel)
        .create_execution(goal("g"))
        .await
        .expect("served");
    let process = Process { child, addr };
    let status =
        tokio::task::spawn_blocking(move || process.terminate(std::time::Duration::from_secs(10)))
            .await
            .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_connection_is_told_the_cap_on_its_concurrent_streams() {
    let app = spawn_app_with(|c| c.max_streams_per_connection = 7).await;
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (mut send, mut conn) = h2::client::handshake(tcp).await.unwrap();
    let request = tonic::codegen::http::Request::post(format!(
        "http://{}/grpc.health.v1.Health/Check",
        app.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    let (response, mut body) = send.send_request(request, false).unwrap();
    // An empty HealthCheckRequest in its gRPC frame.
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    // The server's SETTINGS come before its first answer.
    let response = tokio::select! {
        r = response => r.unwrap(),
        r = &mut conn => panic!("the connection ended: {r:?}"),
    };
    assert_eq!(response.status(), 200);
    assert_eq!(conn.max_concurrent_send_streams(), 7);
}
