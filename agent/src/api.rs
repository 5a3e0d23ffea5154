//! Local API: the agent's snapshot and flow log served as JSON over `<state-dir>/api.sock`, and the client the CLI uses.

use std::convert::Infallible;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::{UnixListener, UnixStream};

use crate::flows::{FilterArgs, FlowFilter, FlowLog, FlowRecord};
use crate::view::SharedSnapshot;

/// The socket's file name inside the state dir.
pub const SOCKET_NAME: &str = "api.sock";
/// Flows returned when `last` is not given and the caller does not follow (Hubble's default).
pub const DEFAULT_LAST: usize = 20;

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// `GET /v1/flows` parameters: `last`, `follow` and the `sluice observe` filters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowQuery {
    /// The newest N matching flows first; `None` means [`DEFAULT_LAST`], or none when following.
    pub last: Option<usize>,
    /// Keep the response open and stream new matching flows.
    pub follow: bool,
    pub filters: FilterArgs,
}

impl FlowQuery {
    pub fn to_query_string(&self) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        if let Some(last) = self.last {
            query.append_pair("last", &last.to_string());
        }
        if self.follow {
            query.append_pair("follow", "true");
        }
        query.extend_pairs(self.filters.query_pairs());
        query.finish()
    }

    pub fn parse(query: &str) -> Result<Self, String> {
        let mut parsed = Self::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match key.as_ref() {
                "last" => {
                    parsed.last = Some(
                        value
                            .parse()
                            .map_err(|_| format!("last={value:?}: expected a count"))?,
                    );
                }
                "follow" => {
                    parsed.follow = value
                        .parse()
                        .map_err(|_| format!("follow={value:?}: expected true or false"))?;
                }
                _ => {
                    if !parsed
                        .filters
                        .push_query_pair(&key, value.clone().into_owned())
                    {
                        return Err(format!("unknown parameter {key:?}"));
                    }
                }
            }
        }
        Ok(parsed)
    }

    fn effective_last(&self) -> usize {
        self.last
            .unwrap_or(if self.follow { 0 } else { DEFAULT_LAST })
    }
}

type ApiBody = UnsyncBoxBody<Bytes, Infallible>;

#[derive(Serialize, serde::Deserialize)]
struct ApiError {
    error: String,
}

fn full(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<ApiBody> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

fn json<T: Serialize>(value: &T) -> Response<ApiBody> {
    match serde_json::to_vec(value) {
        Ok(body) => full(StatusCode::OK, "application/json", body),
        Err(err) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the answer failed: {err}"),
        ),
    }
}

fn error(status: StatusCode, message: String) -> Response<ApiBody> {
    let body = serde_json::to_vec(&ApiError { error: message }).unwrap_or_default();
    full(status, "application/json", body)
}

fn ndjson_line(record: &FlowRecord) -> Bytes {
    match serde_json::to_vec(record) {
        Ok(mut line) => {
            line.push(b'\n');
            Bytes::from(line)
        }
        Err(err) => {
            tracing::warn!(%err, "a flow record could not be encoded");
            Bytes::new()
        }
    }
}

fn flows_response(flows: &FlowLog, query: &FlowQuery) -> Response<ApiBody> {
    let filter = match FlowFilter::parse(&query.filters) {
        Ok(filter) => filter,
        Err(err) => return error(StatusCode::BAD_REQUEST, err.to_string()),
    };
    let last = query.effective_last();
    if !query.follow {
        let body: Vec<u8> = flows
            .recent(&filter, last)
            .iter()
            .flat_map(ndjson_line)
            .collect();
        return full(StatusCode::OK, "application/x-ndjson", body);
    }
    // Subscribed before the response goes out, so every flow recorded after the client sees the
    // headers reaches it.
    let (backlog, subscription) = flows.recent_and_subscribe(&filter, last);
    let backlog: Bytes = backlog.iter().flat_map(ndjson_line).collect();
    let live = futures_util::stream::unfold(
        (subscription, filter),
        |(mut subscription, filter)| async move {
            loop {
                let record = subscription.next().await?;
                if filter.matches(&record) {
                    return Some((ndjson_line(&record), (subscription, filter)));
                }
            }
        },
    );
    let frames = futures_util::stream::once(std::future::ready(backlog))
        .chain(live)
        .filter(|bytes| std::future::ready(!bytes.is_empty()))
        .map(|bytes| Ok::<_, Infallible>(Frame::data(bytes)));
    let mut response = Response::new(StreamBody::new(frames).boxed_unsync());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

fn route(
    snapshot: &SharedSnapshot,
    flows: &FlowLog,
    request: &Request<Incoming>,
) -> Response<ApiBody> {
    if request.method() != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "the local API is read-only: use GET".to_owned(),
        );
    }
    let current = snapshot.load();
    match request.uri().path() {
        "/v1/status" => {
            let mut status = current.status.clone();
            status.flows_seen = flows.seen();
            status.flows_lost = flows.lost();
            json(&status)
        }
        "/v1/endpoints" => json(&current.endpoints),
        "/v1/identities" => json(&current.identities),
        "/v1/policies" => json(&current.policies),
        "/v1/services" => json(&current.services),
        "/v1/flows" => match FlowQuery::parse(request.uri().query().unwrap_or("")) {
            Ok(query) => flows_response(flows, &query),
            Err(message) => error(StatusCode::BAD_REQUEST, message),
        },
        other => error(StatusCode::NOT_FOUND, format!("no such API path {other:?}")),
    }
}

/// The local API's bound socket. Dropping it closes the socket and removes its file, so a
/// stopped agent leaves nothing behind that the next one would take for a live agent.
#[derive(Debug)]
pub struct ApiListener {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for ApiListener {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_file(&self.path) {
            if err.kind() != ErrorKind::NotFound {
                tracing::warn!(socket = %self.path.display(), %err, "cannot remove the API socket");
            }
        }
    }
}

/// Binds `socket`, creating its directory and replacing a stale socket file; refuses when another
/// agent answers on it. Every failure names the path, so `sluice agent` can stop with it.
pub async fn bind_api(socket: &Path) -> anyhow::Result<ApiListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the state dir {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(socket) {
        Ok(_) => {
            if UnixStream::connect(socket).await.is_ok() {
                bail!(
                    "another agent is serving {}: stop it or use another --state-dir",
                    socket.display()
                );
            }
            std::fs::remove_file(socket)
                .with_context(|| format!("removing the stale socket {}", socket.display()))?;
        }
        Err(err) if err.kind() == ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("inspecting {}", socket.display())),
    }
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("binding the API socket {}", socket.display()))?;
    let api = ApiListener {
        listener,
        path: socket.to_path_buf(),
    };
    // Flows name pods and paths: only the agent's user may read them.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to its owner", socket.display()))?;
    Ok(api)
}

/// Serves the local API on `api` until the task is dropped (which removes the socket).
pub async fn serve_api(api: ApiListener, snapshot: SharedSnapshot, flows: FlowLog) {
    tracing::info!(socket = %api.path.display(), "serving the local API");
    loop {
        let stream = match api.listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(%err, "accepting an API connection failed");
                continue;
            }
        };
        let snapshot = snapshot.clone();
        let flows = flows.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = route(&snapshot, &flows, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%err, "API connection ended with an error");
            }
        });
    }
}

async fn request(socket: &Path, path_and_query: &str) -> anyhow::Result<Response<Incoming>> {
    let stream = match UnixStream::connect(socket).await {
        Ok(stream) => stream,
        Err(err)
            if matches!(
                err.kind(),
                ErrorKind::NotFound | ErrorKind::ConnectionRefused
            ) =>
        {
            bail!(
                "no agent at {}: is `sluice agent` running? (--state-dir)",
                socket.display()
            )
        }
        Err(err) => {
            return Err(err)
                .with_context(|| format!("connecting to the agent at {}", socket.display()))
        }
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("talking to the agent at {}", socket.display()))?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(%err, "API client connection ended with an error");
        }
    });
    let request = Request::get(path_and_query)
        .header(http::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())?;
    let response = sender
        .send_request(request)
        .await
        .with_context(|| format!("GET {path_and_query} from the agent"))?;
    if response.status().is_success() {
        return Ok(response);
    }
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|body| body.to_bytes())
        .unwrap_or_default();
    let message = serde_json::from_slice::<ApiError>(&body)
        .map(|api_error| api_error.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
    bail!("the agent answered {status} to GET {path_and_query}: {message}")
}

/// `GET path` on the agent's socket, decoded as JSON.
pub async fn get_json<T: DeserializeOwned>(socket: &Path, path: &str) -> anyhow::Result<T> {
    let response = request(socket, path).await?;
    let body = response
        .into_body()
        .collect()
        .await
        .with_context(|| format!("reading GET {path}"))?
        .to_bytes();
    serde_json::from_slice(&body)
        .with_context(|| format!("decoding the agent's answer to GET {path}"))
}

/// Flows as the agent sends them, one record at a time.
pub struct FlowStream {
    body: Incoming,
    pending: BytesMut,
}

/// Opens `GET /v1/flows` with `query`. When it returns, a following stream is subscribed: every
/// flow the agent records from then on (and matching the filters) will arrive.
pub async fn open_flows(socket: &Path, query: &FlowQuery) -> anyhow::Result<FlowStream> {
    let response = request(socket, &format!("/v1/flows?{}", query.to_query_string())).await?;
    Ok(FlowStream {
        body: response.into_body(),
        pending: BytesMut::new(),
    })
}

impl FlowStream {
    /// The next record, or `None` when the agent ended the response.
    pub async fn next(&mut self) -> anyhow::Result<Option<FlowRecord>> {
        loop {
            if let Some(newline) = self.pending.iter().position(|byte| *byte == b'\n') {
                let line = self.pending.split_to(newline + 1);
                return serde_json::from_slice(&line[..newline])
                    .map(Some)
                    .context("decoding a flow record from the agent");
            }
            match self.body.frame().await {
                Some(frame) => {
                    if let Ok(data) = frame.context("reading flows from the agent")?.into_data() {
                        self.pending.extend_from_slice(&data);
                    }
                }
                None if self.pending.iter().all(u8::is_ascii_whitespace) => return Ok(None),
                None => bail!("the agent ended the flow stream in the middle of a record"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::tests::{exhaust_denied, landing_ok};
    use crate::metrics::Metrics;
    use crate::view::{ServiceView, Snapshot, StatusView};
    use std::sync::Arc;

    fn snapshot() -> SharedSnapshot {
        let snapshot = Snapshot {
            status: StatusView {
                node: "node-1".to_owned(),
                datapath: "none".to_owned(),
                generation: 4,
                ..Default::default()
            },
            services: vec![ServiceView {
                kernel: None,
                name: "default/deathstar:80".to_owned(),
                kind: "ClusterIP".to_owned(),
                frontend: Some("127.0.0.1:18080".parse().expect("addr")),
                listener: "default/deathstar:80".to_owned(),
                envoy_config: None,
                backends: vec!["198.18.0.20:80".parse().expect("addr")],
            }],
            ..Default::default()
        };
        Arc::new(arc_swap::ArcSwap::from_pointee(snapshot))
    }

    struct Agent {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        flows: FlowLog,
        server: tokio::task::JoinHandle<()>,
    }

    impl Drop for Agent {
        fn drop(&mut self) {
            self.server.abort();
        }
    }

    /// Serves the API on a fresh socket and waits until it answers.
    async fn agent() -> anyhow::Result<Agent> {
        let dir = tempfile::tempdir()?;
        let socket = socket_path(dir.path());
        let flows = FlowLog::new(16, Metrics::new());
        let api = bind_api(&socket).await?;
        let server = tokio::spawn(serve_api(api, snapshot(), flows.clone()));
        Ok(Agent {
            _dir: dir,
            socket,
            flows,
            server,
        })
    }

    #[tokio::test]
    async fn snapshot_parts_are_served_as_json() -> anyhow::Result<()> {
        let agent = agent().await?;
        agent.flows.record(landing_ok());
        let status: StatusView = get_json(&agent.socket, "/v1/status").await?;
        assert_eq!(status.node, "node-1");
        assert_eq!(status.generation, 4);
        assert_eq!(status.flows_seen, 1);
        let services: Vec<ServiceView> = get_json(&agent.socket, "/v1/services").await?;
        assert_eq!(services.len(), 1);
        assert_eq!(
            services[0].backends,
            vec!["198.18.0.20:80".parse::<std::net::SocketAddr>()?]
        );
        let endpoints: Vec<crate::view::EndpointView> =
            get_json(&agent.socket, "/v1/endpoints").await?;
        assert!(endpoints.is_empty());

        let mode = std::fs::metadata(&agent.socket)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        Ok(())
    }

    #[tokio::test]
    async fn errors_name_the_problem() -> anyhow::Result<()> {
        let agent = agent().await?;
        let missing = get_json::<serde_json::Value>(&agent.socket, "/v1/nope")
            .await
            .expect_err("404");
        assert!(missing.to_string().contains("404 Not Found"), "{missing}");
        let bad_filter = open_flows(
            &agent.socket,
            &FlowQuery {
                filters: FilterArgs {
                    http_status: vec!["4xx".to_owned()],
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .err()
        .expect("400");
        assert!(
            bad_filter.to_string().contains("--http-status \"4xx\""),
            "{bad_filter}"
        );

        let nowhere = agent.socket.with_file_name("other.sock");
        let no_agent = get_json::<StatusView>(&nowhere, "/v1/status")
            .await
            .expect_err("no socket");
        assert_eq!(
            no_agent.to_string(),
            format!(
                "no agent at {}: is `sluice agent` running? (--state-dir)",
                nowhere.display()
            )
        );
        Ok(())
    }

    #[tokio::test]
    async fn last_flows_are_filtered_and_newest_last() -> anyhow::Result<()> {
        let agent = agent().await?;
        agent.flows.record(landing_ok());
        agent.flows.record(exhaust_denied());
        agent.flows.record(landing_ok());
        let dropped = FlowQuery {
            filters: FilterArgs {
                verdict: vec!["DROPPED".to_owned()],
                ..Default::default()
            },
            ..Default::default()
        };
        let mut stream = open_flows(&agent.socket, &dropped).await?;
        let only = stream.next().await?.expect("one dropped flow");
        assert_eq!(only, FlowRecord::from_event(&exhaust_denied()));
        assert_eq!(stream.next().await?, None);

        let mut newest_two = open_flows(
            &agent.socket,
            &FlowQuery {
                last: Some(2),
                ..Default::default()
            },
        )
        .await?;
        assert_eq!(
            newest_two.next().await?.map(|record| record.verdict),
            Some("DROPPED".to_owned())
        );
        assert_eq!(
            newest_two.next().await?.map(|record| record.verdict),
            Some("FORWARDED".to_owned())
        );
        assert_eq!(newest_two.next().await?, None);
        Ok(())
    }

    #[tokio::test]
    async fn follow_streams_flows_recorded_after_subscribing() -> anyhow::Result<()> {
        let agent = agent().await?;
        agent.flows.record(landing_ok());
        let follow_http_puts = FlowQuery {
            last: Some(5),
            follow: true,
            filters: FilterArgs {
                http_method: vec!["PUT".to_owned()],
                ..Default::default()
            },
        };
        let mut stream = open_flows(&agent.socket, &follow_http_puts).await?;
        agent.flows.record(landing_ok());
        agent.flows.record(exhaust_denied());
        let next = stream.next().await?.expect("stream stays open");
        assert_eq!(next, FlowRecord::from_event(&exhaust_denied()));
        Ok(())
    }

    #[tokio::test]
    async fn a_follower_that_hangs_up_is_forgotten() -> anyhow::Result<()> {
        let agent = agent().await?;
        let stream = open_flows(
            &agent.socket,
            &FlowQuery {
                follow: true,
                ..Default::default()
            },
        )
        .await?;
        assert_eq!(agent.flows.follower_count(), 1);
        drop(stream);
        for _ in 0..1000 {
            if agent.flows.follower_count() == 0 {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        bail!("the server still follows for a client that hung up")
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_is_not() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let socket = socket_path(dir.path());
        drop(std::os::unix::net::UnixListener::bind(&socket)?);
        assert!(socket.exists());
        let listener = bind_api(&socket).await?;
        let refused = bind_api(&socket).await.expect_err("socket in use");
        assert_eq!(
            refused.to_string(),
            format!(
                "another agent is serving {}: stop it or use another --state-dir",
                socket.display()
            )
        );
        assert!(socket.exists(), "the refused agent removed the live socket");
        drop(listener);
        assert!(!socket.exists(), "a closed API leaves its socket file behind");
        Ok(())
    }

    #[tokio::test]
    async fn an_unusable_socket_path_is_an_error_naming_it() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "")?;
        let under_a_file = socket_path(&file.join("state"));
        let err = bind_api(&under_a_file).await.expect_err("parent is a file");
        assert_eq!(
            err.to_string(),
            format!("creating the state dir {}", file.join("state").display())
        );
        // sockaddr_un holds at most 108 bytes of path.
        let too_long = socket_path(&dir.path().join("d".repeat(120)));
        let err = bind_api(&too_long).await.expect_err("path too long");
        assert_eq!(
            err.to_string(),
            format!("binding the API socket {}", too_long.display())
        );
        Ok(())
    }

    #[test]
    fn flow_query_round_trips_through_the_query_string() {
        let query = FlowQuery {
            last: Some(7),
            follow: true,
            filters: FilterArgs {
                http_status: vec!["4+".to_owned()],
                http_path: vec!["^/v1/(a|b)?x=1".to_owned()],
                pod: vec!["default/".to_owned()],
                ..Default::default()
            },
        };
        assert_eq!(FlowQuery::parse(&query.to_query_string()), Ok(query));
        assert_eq!(
            FlowQuery::parse("lats=3"),
            Err("unknown parameter \"lats\"".to_owned())
        );
    }
}
