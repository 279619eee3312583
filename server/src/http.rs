//! The HTTP service (axum): iPXE scripts, the kernel and initramfs, layers (with `Range`, for
//! resumed downloads and chunk repair, and their data extents: [`layers`]). The API under
//! `/api/v1` (operators, and the nodes' manifest and report routes) is `crate::api`, merged
//! into this router by `strata serve`.
//!
//! Booting nodes reach these without a token: `/boot/*` (iPXE has no credentials) and
//! `/layers/*` (content-addressed: a client must already know the blake3 it asks for, and the
//! bytes are the same for every node of a version). docs/api.md lists what else a node may
//! reach without a token.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use tower_http::services::ServeFile;

use crate::boot::ipxe;
use crate::fleet::{Fleet, FleetError};

mod file;
pub mod layers;

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct HttpState {
    /// The server's URL as nodes reach it.
    pub public_url: String,
    /// The kernel nodes boot.
    pub kernel: Option<PathBuf>,
    /// The initramfs with the server key appended.
    pub initramfs: Option<PathBuf>,
    /// Extra kernel arguments.
    pub cmdline: String,
    /// The TFTP root (iPXE binaries), also served over HTTP for UEFI HTTP boot.
    pub tftp_root: PathBuf,
    /// Nodes, roles, images and manifests.
    pub fleet: Arc<Fleet>,
    /// The iSCSI targets, when on: diskless nodes' boot scripts name their portal.
    pub iscsi: Option<Arc<crate::iscsi::FleetLuns>>,
    /// Composes the initramfs for images' own kernels (node-init's archive + the kernel's
    /// modules + the key); `None` without a configured initramfs (every node then boots the
    /// configured kernel).
    pub composer: Option<Arc<crate::boot::initramfs::Composer>>,
}

/// The router for the whole HTTP service.
pub fn router(state: HttpState) -> Router {
    let layer_routes = layers::router(Arc::clone(&state.fleet));
    Router::new()
        .route("/boot/ipxe", get(chain_script))
        .route("/boot/node.ipxe", get(node_script))
        .route("/boot/kernel", get(kernel))
        .route("/boot/initramfs", get(initramfs))
        .route("/boot/kernels/{id}", get(image_kernel))
        .route("/boot/initramfs/{id}", get(image_initramfs))
        .route("/boot/file/{name}", get(boot_file))
        .with_state(state)
        .merge(layer_routes)
}

/// An error as the client sees it: a status, a stable code and a message. Internal detail
/// goes to the log only.
#[derive(Debug)]
pub struct HttpError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl HttpError {
    fn bad_request(message: impl Into<String>) -> Self {
        HttpError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            message: message.into(),
        }
    }
    fn not_found(message: impl Into<String>) -> Self {
        HttpError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: message.into(),
        }
    }
    fn unavailable(message: impl Into<String>) -> Self {
        HttpError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "unavailable",
            message: message.into(),
        }
    }
}

impl From<FleetError> for HttpError {
    fn from(err: FleetError) -> Self {
        match err {
            FleetError::NoImage { .. } => HttpError::unavailable(err.to_string()),
            ref other => {
                tracing::error!(error = %other, detail = ?other, "fleet error");
                HttpError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    code: "internal",
                    message: "internal error; see the server log".into(),
                }
            }
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

fn ipxe_response(script: String) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        script,
    )
        .into_response()
}

fn parse_mac(text: &str) -> Result<String, HttpError> {
    ipxe::normalize_mac(text)
        .ok_or_else(|| HttpError::bad_request(format!("not a MAC address: {:?}", truncate(text))))
}

fn truncate(text: &str) -> &str {
    match text.char_indices().nth(64) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

async fn chain_script(State(st): State<HttpState>) -> Response {
    ipxe_response(ipxe::chain_script(&st.public_url))
}

#[derive(Deserialize)]
struct MacQuery {
    mac: String,
}

async fn node_script(
    State(st): State<HttpState>,
    Query(q): Query<MacQuery>,
) -> Result<Response, HttpError> {
    let mac = parse_mac(&q.mac)?;
    let node = st.fleet.node_booting(&mac).await?;
    if let Some(script) = st.iscsi.as_ref().and_then(|l| l.sanboot_script(&mac)) {
        return Ok(ipxe_response(script));
    }
    st.fleet.netbooted(&mac);
    let iscsi_args = st.iscsi.as_ref().and_then(|l| l.boot_args(&mac));
    let files = image_boot_files(&st, &mac).await;
    Ok(ipxe_response(ipxe::node_script(&ipxe::NodeBoot {
        public_url: &st.public_url,
        mac: &mac,
        node: &node.name,
        role: &node.role,
        extra_cmdline: &st.cmdline,
        node_cmdline: iscsi_args.as_deref(),
        files: files.as_ref(),
    })))
}

/// The kernel recorded with the version `mac` boots and the initramfs composed for it, or
/// `None` for the configured ones: no composer, no kernel or no module archive recorded, or
/// the lookup failed (logged; the node still boots, as before images carried kernels).
async fn image_boot_files(st: &HttpState, mac: &str) -> Option<ipxe::ImageBootFiles> {
    let composer = st.composer.as_ref()?;
    let k = match st.fleet.boot_kernel(mac).await {
        Ok(k) => k?,
        Err(FleetError::NoImage { .. }) => return None,
        Err(e) => {
            tracing::error!(%mac, error = %e, "looking up the node's kernel; booting the configured one");
            return None;
        }
    };
    let Some((modules_id, modules_path)) = k.modules.clone() else {
        tracing::debug!(%mac, image = %k.image, version = k.version, "no module archive recorded; booting the configured kernel");
        return None;
    };
    let c = Arc::clone(composer);
    let composed = tokio::task::spawn_blocking(move || c.compose(&modules_id, &modules_path)).await;
    match composed {
        Ok(Ok((initramfs, _))) => Some(ipxe::ImageBootFiles {
            image: k.image,
            version: k.version,
            release: k.release,
            kernel: k.kernel,
            initramfs,
        }),
        Ok(Err(e)) => {
            tracing::error!(%mac, error = %e, "composing the initramfs; booting the configured kernel");
            None
        }
        Err(e) => {
            tracing::error!(%mac, error = %e, "initramfs task; booting the configured kernel");
            None
        }
    }
}

/// Content-addressed boot files never change: caches may keep them for good.
fn immutable(mut resp: Response) -> Response {
    if resp.status().is_success() || resp.status() == StatusCode::NOT_MODIFIED {
        resp.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("public, max-age=31536000, immutable"),
        );
    }
    resp
}

fn parse_digest(id: &str, what: &str) -> Result<wire::chunk::Digest, HttpError> {
    id.parse()
        .map_err(|_| HttpError::bad_request(format!("not a {what} id: {:?}", truncate(id))))
}

/// `/boot/kernels/<blake3>`: a kernel an image version records.
async fn image_kernel(
    State(st): State<HttpState>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, HttpError> {
    let id = parse_digest(&id, "kernel")?;
    let path = st
        .fleet
        .blob_path(&id, "kernel")
        .await?
        .ok_or_else(|| HttpError::not_found(format!("no kernel {id}")))?;
    Ok(immutable(serve_file(Some(&path), "kernel", req).await?))
}

/// `/boot/initramfs/<blake3>`: an initramfs composed for an image's kernel.
async fn image_initramfs(
    State(st): State<HttpState>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, HttpError> {
    let id = parse_digest(&id, "initramfs")?;
    let path = st
        .composer
        .as_ref()
        .map(|c| c.path_of(&id))
        .filter(|p| p.is_file())
        .ok_or_else(|| HttpError::not_found(format!("no initramfs {id}")))?;
    Ok(immutable(serve_file(Some(&path), "initramfs", req).await?))
}

/// Serves a file with `GET` or `HEAD`. `ServeFile` decides the status and headers
/// (`Range`: 206 with `Content-Range` or 416; conditional requests: 304 or 412; HEAD) from a
/// `HEAD` twin of the request, so it never opens a body; a `GET` answered 200 or 206 then gets
/// [`file::FileBody`], which streams the range with large positioned reads, one read ahead.
async fn serve_file(
    path: Option<&PathBuf>,
    what: &str,
    req: Request,
) -> Result<Response, HttpError> {
    let path = path.ok_or_else(|| {
        HttpError::unavailable(format!(
            "no {what} configured (boot.{what} in the configuration)"
        ))
    })?;
    let get = req.method() == Method::GET;
    let (parts, _) = req.into_parts();
    let mut twin = Request::new(Body::empty());
    *twin.method_mut() = if get { Method::HEAD } else { parts.method };
    *twin.uri_mut() = parts.uri;
    *twin.headers_mut() = parts.headers;
    let resp = match ServeFile::new(path).try_call(twin).await {
        Ok(resp) => resp.into_response(),
        Err(err) => {
            tracing::error!(file = %path.display(), error = %err, "serving file");
            return Err(HttpError::not_found(format!("{what} unreadable")));
        }
    };
    if !get {
        return Ok(resp);
    }
    let (range, size) = match resp.status() {
        StatusCode::OK => {
            let len = header_str(&resp, header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
            match len {
                Some(len) => (0..len, len),
                None => return Err(file_internal(path, "200 without Content-Length")),
            }
        }
        StatusCode::PARTIAL_CONTENT => {
            match header_str(&resp, header::CONTENT_RANGE).and_then(file::parse_content_range) {
                Some(found) => found,
                None => return Err(file_internal(path, "206 without a Content-Range")),
            }
        }
        // 304, 412, 416 and the like carry no file bytes.
        _ => return Ok(resp),
    };
    let open = path.clone();
    let file = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&open)?;
        let len = file.metadata()?.len();
        Ok::<_, std::io::Error>((file, len))
    })
    .await;
    match file {
        Ok(Ok((file, len))) if len == size => {
            let (parts, _) = resp.into_parts();
            Ok(Response::from_parts(
                parts,
                Body::new(file::FileBody::new(file, range)),
            ))
        }
        // Replaced between the headers and the open (a kernel or initramfs; layers never change).
        Ok(Ok((_, len))) => {
            tracing::warn!(file = %path.display(), size, now = len, "file changed while being served");
            Err(HttpError::unavailable(format!(
                "{what} changed while being served; retry"
            )))
        }
        Ok(Err(err)) => {
            tracing::error!(file = %path.display(), error = %err, "opening file");
            Err(HttpError::not_found(format!("{what} unreadable")))
        }
        Err(err) => Err(file_internal(path, &format!("open task: {err}"))),
    }
}

fn header_str(resp: &Response, name: header::HeaderName) -> Option<&str> {
    resp.headers().get(name)?.to_str().ok()
}

fn file_internal(path: &std::path::Path, detail: &str) -> HttpError {
    tracing::error!(file = %path.display(), detail, "serving file");
    HttpError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        code: "internal",
        message: "internal error; see the server log".into(),
    }
}

async fn kernel(State(st): State<HttpState>, req: Request) -> Result<Response, HttpError> {
    serve_file(st.kernel.as_ref(), "kernel", req).await
}

async fn initramfs(State(st): State<HttpState>, req: Request) -> Result<Response, HttpError> {
    serve_file(st.initramfs.as_ref(), "initramfs", req).await
}

/// A file of the TFTP root by plain name (UEFI HTTP boot clients load `ipxe.efi` this way).
async fn boot_file(
    State(st): State<HttpState>,
    Path(name): Path<String>,
    req: Request,
) -> Result<Response, HttpError> {
    let plain = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !plain {
        return Err(HttpError::bad_request(format!(
            "not a boot file name: {:?}",
            truncate(&name)
        )));
    }
    let path = st.tftp_root.join(&name);
    if !path.is_file() {
        return Err(HttpError::not_found(format!("no boot file {name}")));
    }
    serve_file(Some(&path), "boot file", req).await
}
