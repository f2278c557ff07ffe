//! End-to-end gRPC over real Unix sockets: the generated servers and clients, reached through
//! `gm_proto::uds`, answer on exactly the HTTP/2 paths the kubelet uses.

use std::time::Duration;

use gm_proto::deviceplugin::v1beta1::{
    self as dp,
    device_plugin_client::DevicePluginClient,
    device_plugin_server::{DevicePlugin, DevicePluginServer},
    registration_client::RegistrationClient,
    registration_server::{Registration, RegistrationServer},
};
use gm_proto::podresources::v1::{
    self as pr,
    pod_resources_lister_client::PodResourcesListerClient,
    pod_resources_lister_server::{PodResourcesLister, PodResourcesListerServer},
};
use gm_proto::uds;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::server::Router;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};

/// Upper bound for every network step, so a broken transport fails instead of hanging.
const STEP: Duration = Duration::from_secs(5);

async fn bounded<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(STEP, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what} did not finish within {STEP:?}"),
    }
}

/// Serves `router` on a fresh socket `name` in `dir` and returns a channel connected to it.
async fn serve_and_connect(
    dir: &tempfile::TempDir,
    name: &str,
    router: Router,
) -> (Channel, JoinHandle<()>) {
    let path = dir.path().join(name);
    let listener = uds::bind(&path).await.expect("bind test socket");
    let server = tokio::spawn(async move {
        router
            .serve_with_incoming(uds::incoming(listener))
            .await
            .expect("test server failed");
    });
    let channel = bounded("connect", uds::connect(&path))
        .await
        .expect("connect to test socket");
    (channel, server)
}

/// Calls a unary method by its literal HTTP/2 path, bypassing the generated client.
async fn raw_unary<Req, Resp>(
    channel: Channel,
    path: &'static str,
    req: Req,
) -> Result<Resp, Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    let response = grpc
        .unary(Request::new(req), PathAndQuery::from_static(path), codec)
        .await?;
    Ok(response.into_inner())
}

/// Makes a gRPC result comparable: the error becomes "<code>: <message>".
fn ok<T>(result: Result<T, Status>) -> Result<T, String> {
    result.map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

// ---------------------------------------------------------------------------------------------
// Test servers

/// A kubelet registration endpoint that forwards every request to the test.
struct FakeKubelet {
    seen: mpsc::UnboundedSender<dp::RegisterRequest>,
}

#[tonic::async_trait]
impl Registration for FakeKubelet {
    async fn register(
        &self,
        request: Request<dp::RegisterRequest>,
    ) -> Result<Response<dp::Empty>, Status> {
        let req = request.into_inner();
        if req.version != dp::VERSION {
            return Err(Status::invalid_argument(format!(
                "unsupported version {:?}",
                req.version
            )));
        }
        self.seen
            .send(req)
            .map_err(|_| Status::internal("test receiver gone"))?;
        Ok(Response::new(dp::Empty {}))
    }
}

fn options() -> dp::DevicePluginOptions {
    dp::DevicePluginOptions {
        pre_start_required: true,
        get_preferred_allocation_available: true,
    }
}

fn devices() -> dp::ListAndWatchResponse {
    dp::ListAndWatchResponse {
        devices: vec![
            dp::Device {
                id: "GPU-0".to_owned(),
                health: dp::HEALTHY.to_owned(),
                topology: Some(dp::TopologyInfo {
                    nodes: vec![dp::NumaNode { id: 0 }],
                }),
            },
            dp::Device {
                id: "GPU-1".to_owned(),
                health: dp::UNHEALTHY.to_owned(),
                topology: None,
            },
        ],
    }
}

/// A device plugin with a fixed device list that echoes requests into its answers.
struct FakePlugin;

type DeviceStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<dp::ListAndWatchResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl DevicePlugin for FakePlugin {
    async fn get_device_plugin_options(
        &self,
        _request: Request<dp::Empty>,
    ) -> Result<Response<dp::DevicePluginOptions>, Status> {
        Ok(Response::new(options()))
    }

    type ListAndWatchStream = DeviceStream;

    async fn list_and_watch(
        &self,
        _request: Request<dp::Empty>,
    ) -> Result<Response<DeviceStream>, Status> {
        // Like a real plugin: the full list at once, then the stream stays open.
        let stream = tokio_stream::iter([Ok(devices())]).chain(tokio_stream::pending());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<dp::PreferredAllocationRequest>,
    ) -> Result<Response<dp::PreferredAllocationResponse>, Status> {
        let container_responses = request
            .into_inner()
            .container_requests
            .into_iter()
            .map(|c| dp::ContainerPreferredAllocationResponse {
                device_i_ds: c
                    .available_device_i_ds
                    .into_iter()
                    .take(usize::try_from(c.allocation_size).unwrap_or(0))
                    .collect(),
            })
            .collect();
        Ok(Response::new(dp::PreferredAllocationResponse {
            container_responses,
        }))
    }

    async fn allocate(
        &self,
        request: Request<dp::AllocateRequest>,
    ) -> Result<Response<dp::AllocateResponse>, Status> {
        let container_responses = request
            .into_inner()
            .container_requests
            .into_iter()
            .map(|c| dp::ContainerAllocateResponse {
                envs: [("VISIBLE".to_owned(), c.devices_ids.join(","))].into(),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(dp::AllocateResponse {
            container_responses,
        }))
    }

    async fn pre_start_container(
        &self,
        request: Request<dp::PreStartContainerRequest>,
    ) -> Result<Response<dp::PreStartContainerResponse>, Status> {
        if request.into_inner().devices_ids.is_empty() {
            return Err(Status::invalid_argument("no devices"));
        }
        Ok(Response::new(dp::PreStartContainerResponse {}))
    }
}

fn pod() -> pr::PodResources {
    pr::PodResources {
        name: "train".to_owned(),
        namespace: "ml".to_owned(),
        containers: vec![pr::ContainerResources {
            name: "main".to_owned(),
            devices: vec![pr::ContainerDevices {
                resource_name: "tencent.com/vcuda-core".to_owned(),
                device_ids: vec!["GPU-0".to_owned()],
                topology: None,
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A kubelet pod-resources endpoint with one pod.
struct FakeLister;

#[tonic::async_trait]
impl PodResourcesLister for FakeLister {
    async fn list(
        &self,
        _request: Request<pr::ListPodResourcesRequest>,
    ) -> Result<Response<pr::ListPodResourcesResponse>, Status> {
        Ok(Response::new(pr::ListPodResourcesResponse {
            pod_resources: vec![pod()],
        }))
    }

    async fn get_allocatable_resources(
        &self,
        _request: Request<pr::AllocatableResourcesRequest>,
    ) -> Result<Response<pr::AllocatableResourcesResponse>, Status> {
        Ok(Response::new(pr::AllocatableResourcesResponse {
            cpu_ids: vec![0, 1],
            ..Default::default()
        }))
    }

    async fn get(
        &self,
        request: Request<pr::GetPodResourcesRequest>,
    ) -> Result<Response<pr::GetPodResourcesResponse>, Status> {
        let req = request.into_inner();
        let pod = pod();
        if req.pod_name != pod.name || req.pod_namespace != pod.namespace {
            return Err(Status::not_found(format!(
                "pod {}/{} not found",
                req.pod_namespace, req.pod_name
            )));
        }
        Ok(Response::new(pr::GetPodResourcesResponse {
            pod_resources: Some(pod),
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// Registration

#[tokio::test]
async fn plugin_registers_with_kubelet_over_unix_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let router =
        Server::builder().add_service(RegistrationServer::new(FakeKubelet { seen: seen_tx }));
    let (channel, _server) = serve_and_connect(&dir, dp::KUBELET_SOCKET, router).await;

    let request = dp::RegisterRequest {
        version: dp::VERSION.to_owned(),
        endpoint: "vcuda.sock".to_owned(),
        resource_name: "tencent.com/vcuda-core".to_owned(),
        options: Some(options()),
    };
    let reply = bounded(
        "register",
        RegistrationClient::new(channel).register(request.clone()),
    )
    .await;
    assert_eq!(ok(reply.map(Response::into_inner)), Ok(dp::Empty {}));
    assert_eq!(seen_rx.recv().await, Some(request));
}

#[tokio::test]
async fn kubelet_rejection_reaches_the_registering_plugin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (seen_tx, _seen_rx) = mpsc::unbounded_channel();
    let router =
        Server::builder().add_service(RegistrationServer::new(FakeKubelet { seen: seen_tx }));
    let (channel, _server) = serve_and_connect(&dir, dp::KUBELET_SOCKET, router).await;

    let request = dp::RegisterRequest {
        version: "v1alpha".to_owned(),
        ..Default::default()
    };
    let status = bounded(
        "register",
        RegistrationClient::new(channel).register(request),
    )
    .await
    .expect_err("kubelet must reject the old version");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("v1alpha"), "{status:?}");
}

#[tokio::test]
async fn registration_answers_on_the_kubelet_path() {
    assert_eq!(
        gm_proto::deviceplugin::v1beta1::registration_server::SERVICE_NAME,
        "v1beta1.Registration"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let router =
        Server::builder().add_service(RegistrationServer::new(FakeKubelet { seen: seen_tx }));
    let (channel, _server) = serve_and_connect(&dir, dp::KUBELET_SOCKET, router).await;

    let request = dp::RegisterRequest {
        version: dp::VERSION.to_owned(),
        endpoint: "x.sock".to_owned(),
        ..Default::default()
    };
    let reply: Result<dp::Empty, _> = bounded(
        "raw register",
        raw_unary(channel, "/v1beta1.Registration/Register", request.clone()),
    )
    .await;
    assert_eq!(ok(reply), Ok(dp::Empty {}));
    assert_eq!(seen_rx.recv().await, Some(request));
}

// ---------------------------------------------------------------------------------------------
// DevicePlugin

#[tokio::test]
async fn list_and_watch_delivers_the_device_list_to_the_kubelet() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Server::builder().add_service(DevicePluginServer::new(FakePlugin));
    let (channel, _server) = serve_and_connect(&dir, "vcuda.sock", router).await;

    let mut client = DevicePluginClient::new(channel);
    let mut stream = bounded("open stream", client.list_and_watch(dp::Empty {}))
        .await
        .expect("ListAndWatch accepted")
        .into_inner();
    let first = bounded("first message", stream.message()).await;
    assert_eq!(ok(first), Ok(Some(devices())));
}

#[tokio::test]
async fn generated_device_plugin_client_reaches_every_method() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Server::builder().add_service(DevicePluginServer::new(FakePlugin));
    let (channel, _server) = serve_and_connect(&dir, "vcuda.sock", router).await;
    let mut client = DevicePluginClient::new(channel);

    let opts = bounded("options", client.get_device_plugin_options(dp::Empty {})).await;
    assert_eq!(ok(opts.map(Response::into_inner)), Ok(options()));

    let preferred = bounded(
        "preferred",
        client.get_preferred_allocation(dp::PreferredAllocationRequest {
            container_requests: vec![dp::ContainerPreferredAllocationRequest {
                available_device_i_ds: vec!["a".into(), "b".into(), "c".into()],
                must_include_device_i_ds: vec![],
                allocation_size: 2,
            }],
        }),
    )
    .await
    .expect("GetPreferredAllocation")
    .into_inner();
    assert_eq!(preferred.container_responses[0].device_i_ds, ["a", "b"]);

    let allocated = bounded(
        "allocate",
        client.allocate(dp::AllocateRequest {
            container_requests: vec![dp::ContainerAllocateRequest {
                devices_ids: vec!["GPU-0".into(), "GPU-1".into()],
            }],
        }),
    )
    .await
    .expect("Allocate")
    .into_inner();
    assert_eq!(
        allocated.container_responses[0]
            .envs
            .get("VISIBLE")
            .map(String::as_str),
        Some("GPU-0,GPU-1")
    );

    let pre_start = bounded(
        "pre-start",
        client.pre_start_container(dp::PreStartContainerRequest {
            devices_ids: vec!["GPU-0".into()],
        }),
    )
    .await;
    assert_eq!(
        ok(pre_start.map(Response::into_inner)),
        Ok(dp::PreStartContainerResponse {})
    );
}

#[tokio::test]
async fn device_plugin_answers_on_the_kubelet_paths() {
    assert_eq!(
        gm_proto::deviceplugin::v1beta1::device_plugin_server::SERVICE_NAME,
        "v1beta1.DevicePlugin"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Server::builder().add_service(DevicePluginServer::new(FakePlugin));
    let (channel, _server) = serve_and_connect(&dir, "vcuda.sock", router).await;

    let opts: Result<dp::DevicePluginOptions, _> = bounded(
        "raw options",
        raw_unary(
            channel.clone(),
            "/v1beta1.DevicePlugin/GetDevicePluginOptions",
            dp::Empty {},
        ),
    )
    .await;
    assert_eq!(ok(opts), Ok(options()));

    let preferred: Result<dp::PreferredAllocationResponse, _> = bounded(
        "raw preferred",
        raw_unary(
            channel.clone(),
            "/v1beta1.DevicePlugin/GetPreferredAllocation",
            dp::PreferredAllocationRequest {
                container_requests: vec![dp::ContainerPreferredAllocationRequest {
                    available_device_i_ds: vec!["a".into(), "b".into()],
                    must_include_device_i_ds: vec![],
                    allocation_size: 1,
                }],
            },
        ),
    )
    .await;
    assert_eq!(
        ok(preferred.map(|r| r.container_responses)),
        Ok(vec![dp::ContainerPreferredAllocationResponse {
            device_i_ds: vec!["a".into()]
        }])
    );

    let allocated: Result<dp::AllocateResponse, _> = bounded(
        "raw allocate",
        raw_unary(
            channel.clone(),
            "/v1beta1.DevicePlugin/Allocate",
            dp::AllocateRequest {
                container_requests: vec![dp::ContainerAllocateRequest {
                    devices_ids: vec!["GPU-1".into()],
                }],
            },
        ),
    )
    .await;
    assert_eq!(
        ok(allocated.map(|r| r.container_responses[0].envs.get("VISIBLE").cloned())),
        Ok(Some("GPU-1".to_owned()))
    );

    let pre_start: Result<dp::PreStartContainerResponse, _> = bounded(
        "raw pre-start",
        raw_unary(
            channel.clone(),
            "/v1beta1.DevicePlugin/PreStartContainer",
            dp::PreStartContainerRequest {
                devices_ids: vec!["GPU-0".into()],
            },
        ),
    )
    .await;
    assert_eq!(ok(pre_start), Ok(dp::PreStartContainerResponse {}));

    // Server streaming by literal path.
    let mut grpc = tonic::client::Grpc::new(channel);
    bounded("ready", grpc.ready()).await.expect("channel ready");
    let mut stream = bounded(
        "raw list-and-watch",
        grpc.server_streaming(
            Request::new(dp::Empty {}),
            PathAndQuery::from_static("/v1beta1.DevicePlugin/ListAndWatch"),
            tonic_prost::ProstCodec::<dp::Empty, dp::ListAndWatchResponse>::default(),
        ),
    )
    .await
    .expect("ListAndWatch by path")
    .into_inner();
    assert_eq!(
        ok(bounded("first message", stream.message()).await),
        Ok(Some(devices()))
    );
}

#[tokio::test]
async fn a_path_outside_package_v1beta1_is_unimplemented() {
    // The legacy v1alpha API used package `deviceplugin`; the kubelet-facing paths must not.
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Server::builder().add_service(DevicePluginServer::new(FakePlugin));
    let (channel, _server) = serve_and_connect(&dir, "vcuda.sock", router).await;
    let reply: Result<dp::AllocateResponse, _> = bounded(
        "wrong path",
        raw_unary(
            channel,
            "/deviceplugin.DevicePlugin/Allocate",
            dp::AllocateRequest::default(),
        ),
    )
    .await;
    assert_eq!(reply.map_err(|s| s.code()), Err(Code::Unimplemented));
}

// ---------------------------------------------------------------------------------------------
// PodResourcesLister

#[tokio::test]
async fn pod_resources_lister_answers_on_the_kubelet_paths() {
    assert_eq!(
        gm_proto::podresources::v1::pod_resources_lister_server::SERVICE_NAME,
        "v1.PodResourcesLister"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Server::builder().add_service(PodResourcesListerServer::new(FakeLister));
    let (channel, _server) = serve_and_connect(&dir, "kubelet.sock", router).await;

    let list: Result<pr::ListPodResourcesResponse, _> = bounded(
        "raw list",
        raw_unary(
            channel.clone(),
            "/v1.PodResourcesLister/List",
            pr::ListPodResourcesRequest {},
        ),
    )
    .await;
    assert_eq!(ok(list.map(|r| r.pod_resources)), Ok(vec![pod()]));

    let allocatable: Result<pr::AllocatableResourcesResponse, _> = bounded(
        "raw allocatable",
        raw_unary(
            channel.clone(),
            "/v1.PodResourcesLister/GetAllocatableResources",
            pr::AllocatableResourcesRequest {},
        ),
    )
    .await;
    assert_eq!(ok(allocatable.map(|r| r.cpu_ids)), Ok(vec![0, 1]));

    let get: Result<pr::GetPodResourcesResponse, _> = bounded(
        "raw get",
        raw_unary(
            channel,
            "/v1.PodResourcesLister/Get",
            pr::GetPodResourcesRequest {
                pod_name: "train".into(),
                pod_namespace: "ml".into(),
            },
        ),
    )
    .await;
    assert_eq!(ok(get.map(|r| r.pod_resources)), Ok(Some(pod())));
}

#[tokio::test]
async fn generated_pod_resources_client_lists_and_gets_pods() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = Server::builder().add_service(PodResourcesListerServer::new(FakeLister));
    let (channel, _server) = serve_and_connect(&dir, "kubelet.sock", router).await;
    let mut client = PodResourcesListerClient::new(channel);

    let list = bounded("list", client.list(pr::ListPodResourcesRequest {})).await;
    assert_eq!(
        ok(list.map(|r| r.into_inner().pod_resources)),
        Ok(vec![pod()])
    );

    let allocatable = bounded(
        "allocatable",
        client.get_allocatable_resources(pr::AllocatableResourcesRequest {}),
    )
    .await;
    assert_eq!(
        ok(allocatable.map(|r| r.into_inner().cpu_ids)),
        Ok(vec![0, 1])
    );

    let missing = bounded(
        "get missing",
        client.get(pr::GetPodResourcesRequest {
            pod_name: "nope".into(),
            pod_namespace: "ml".into(),
        }),
    )
    .await
    .expect_err("unknown pod");
    assert_eq!(missing.code(), Code::NotFound);
}
