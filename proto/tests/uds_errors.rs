//! `gm_proto::uds` fails fast, with the socket path in the message, instead of hanging or
//! panicking, and `bind` handles leftovers of an earlier run safely.

use std::time::Duration;

use gm_proto::deviceplugin::v1beta1::{
    self as dp,
    device_plugin_client::DevicePluginClient,
    device_plugin_server::{DevicePlugin, DevicePluginServer},
};
use gm_proto::uds::{self, UdsError};
use tonic::transport::Server;
use tonic::{Request, Response, Status};

const BOUND: Duration = Duration::from_secs(3);

async fn connect_bounded(path: &std::path::Path) -> Result<tonic::transport::Channel, UdsError> {
    match tokio::time::timeout(BOUND, uds::connect(path)).await {
        Ok(result) => result,
        Err(_) => panic!("uds::connect({}) hung for {BOUND:?}", path.display()),
    }
}

#[tokio::test]
async fn connecting_to_a_missing_socket_fails_fast_naming_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubelet.sock");
    let err = connect_bounded(&path)
        .await
        .expect_err("nothing listens there");
    assert!(matches!(err, UdsError::NotFound { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("does not exist"), "{message}");
}

#[tokio::test]
async fn connecting_to_a_dead_socket_is_refused_naming_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("stale.sock");
    // A socket file whose server has gone: the file stays, nobody accepts.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    let err = connect_bounded(&path).await.expect_err("nobody accepts");
    assert!(matches!(err, UdsError::Connect { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.to_lowercase().contains("refused"), "{message}");
}

#[tokio::test]
async fn connecting_to_a_regular_file_is_rejected_as_not_a_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("plain-file");
    std::fs::write(&path, b"not a socket").expect("write");
    let err = connect_bounded(&path).await.expect_err("not a socket");
    assert!(matches!(err, UdsError::NotASocket { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

struct OptionsOnly;

#[tonic::async_trait]
impl DevicePlugin for OptionsOnly {
    async fn get_device_plugin_options(
        &self,
        _request: Request<dp::Empty>,
    ) -> Result<Response<dp::DevicePluginOptions>, Status> {
        Ok(Response::new(dp::DevicePluginOptions {
            pre_start_required: false,
            get_preferred_allocation_available: true,
        }))
    }

    type ListAndWatchStream = tokio_stream::Pending<Result<dp::ListAndWatchResponse, Status>>;

    async fn list_and_watch(
        &self,
        _request: Request<dp::Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        Ok(Response::new(tokio_stream::pending()))
    }

    async fn get_preferred_allocation(
        &self,
        _request: Request<dp::PreferredAllocationRequest>,
    ) -> Result<Response<dp::PreferredAllocationResponse>, Status> {
        Err(Status::unimplemented("not needed here"))
    }

    async fn allocate(
        &self,
        _request: Request<dp::AllocateRequest>,
    ) -> Result<Response<dp::AllocateResponse>, Status> {
        Err(Status::unimplemented("not needed here"))
    }

    async fn pre_start_container(
        &self,
        _request: Request<dp::PreStartContainerRequest>,
    ) -> Result<Response<dp::PreStartContainerResponse>, Status> {
        Err(Status::unimplemented("not needed here"))
    }
}

#[tokio::test]
async fn bind_replaces_a_stale_socket_left_by_an_earlier_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vcuda.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    assert!(path.exists(), "stale socket file should be left behind");

    let listener = uds::bind(&path).await.expect("bind over stale socket");
    let _server = tokio::spawn(
        Server::builder()
            .add_service(DevicePluginServer::new(OptionsOnly))
            .serve_with_incoming(uds::incoming(listener)),
    );
    let channel = connect_bounded(&path).await.expect("connect to new server");
    let reply = tokio::time::timeout(
        BOUND,
        DevicePluginClient::new(channel).get_device_plugin_options(dp::Empty {}),
    )
    .await
    .expect("call finished in time");
    let options = reply.expect("GetDevicePluginOptions").into_inner();
    assert!(options.get_preferred_allocation_available);
}

#[tokio::test]
async fn bind_refuses_to_delete_a_file_that_is_not_a_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubelet_internal_checkpoint");
    std::fs::write(&path, b"{}").expect("write");
    let err = uds::bind(&path)
        .await
        .expect_err("must not clobber a regular file");
    assert!(matches!(err, UdsError::NotASocket { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).expect("file still there"), b"{}");
}

#[tokio::test]
async fn bind_in_a_missing_directory_names_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("no-such-dir").join("x.sock");
    let err = uds::bind(&path).await.expect_err("parent missing");
    assert!(matches!(err, UdsError::Bind { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}
