//! A Rust application for the end-to-end tests: tokio-postgres, unmodified,
//! running each statement given on the command line with the extended
//! protocol (`Client::execute`: Parse and Describe, then Bind and Execute in
//! a second round trip). Prints one JSON line per statement, then the
//! notices the server sent.
//!
//! `pg_client CONNINFO SQL...`

use tokio_postgres::{AsyncMessage, NoTls};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let conninfo = args.next().expect("usage: pg_client CONNINFO SQL...");
    let (client, mut connection) = tokio_postgres::connect(&conninfo, NoTls)
        .await
        .expect("connecting");
    let (tx, mut notices) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(futures_util::stream::poll_fn(move |cx| {
            connection.poll_message(cx)
        }));
        use futures_util::StreamExt;
        while let Some(Ok(m)) = stream.next().await {
            if let AsyncMessage::Notice(n) = m {
                let _ = tx.send(n.message().to_owned());
            }
        }
    });
    for sql in args {
        let line = match client.execute(sql.as_str(), &[]).await {
            Ok(rows) => serde_json::json!({ "sql": sql, "rows": rows }),
            Err(e) => {
                let db = e.as_db_error();
                serde_json::json!({
                    "sql": sql,
                    "code": db.map(|d| d.code().code().to_owned()),
                    "error": db.map_or(e.to_string(), |d| d.message().to_owned()),
                })
            }
        };
        println!("{line}");
    }
    drop(client);
    let mut all = Vec::new();
    while let Ok(n) = notices.try_recv() {
        all.push(n);
    }
    println!("{}", serde_json::json!({ "notices": all }));
}
