//! Wire compatibility of the device plugin v1beta1 messages with the kubelet.
//!
//! Every expected byte string below was computed by hand from the field tables of the kubelet
//! API (tag byte = field_number << 3 | wire_type; wire type 0 = varint, 2 = length-delimited),
//! so a wrong field number or field type in our `.proto` fails these tests.

use std::collections::HashMap;
use std::fmt::Debug;

use gm_proto::deviceplugin::v1beta1::*;
use prost::Message;

/// Encodes `msg` and compares with `expected`, then decodes `expected` and compares with `msg`.
fn assert_wire<M: Message + Default + PartialEq + Debug>(msg: &M, expected: &[u8]) {
    let name = std::any::type_name::<M>();
    assert_eq!(msg.encode_to_vec(), expected, "encoding of {name}");
    let decoded = M::decode(expected).unwrap_or_else(|e| panic!("decoding {name}: {e}"));
    assert_eq!(&decoded, msg, "decoding of {name}");
}

#[test]
fn device_plugin_options_encode_both_flags_as_varints_1_and_2() {
    let msg = DevicePluginOptions {
        pre_start_required: true,
        get_preferred_allocation_available: true,
    };
    let expected = [
        0x08, 0x01, // 1 pre_start_required: bool, varint (1<<3|0) = true
        0x10, 0x01, // 2 get_preferred_allocation_available: bool, varint (2<<3|0) = true
    ];
    assert_wire(&msg, &expected);
}

#[test]
fn register_request_encodes_version_endpoint_resource_and_options() {
    let msg = RegisterRequest {
        version: VERSION.to_owned(),
        endpoint: "gpu.sock".to_owned(),
        resource_name: "tencent.com/vcuda-core".to_owned(),
        options: Some(DevicePluginOptions {
            pre_start_required: true,
            get_preferred_allocation_available: true,
        }),
    };
    let expected = [
        &[0x0a, 0x07][..], // 1 version: string (1<<3|2), 7 bytes
        b"v1beta1",
        &[0x12, 0x08], // 2 endpoint: string (2<<3|2), 8 bytes
        b"gpu.sock",
        &[0x1a, 0x16], // 3 resource_name: string (3<<3|2), 22 bytes
        b"tencent.com/vcuda-core",
        &[0x22, 0x04],             // 4 options: DevicePluginOptions (4<<3|2), 4 bytes
        &[0x08, 0x01, 0x10, 0x01], //   both flags true
    ]
    .concat();
    assert_wire(&msg, &expected);
}

#[test]
fn empty_encodes_to_no_bytes() {
    assert!(Empty {}.encode_to_vec().is_empty());
    assert_eq!(Empty::decode(&[][..]), Ok(Empty {}));
}

#[test]
fn pre_start_container_response_encodes_to_no_bytes() {
    assert!(PreStartContainerResponse {}.encode_to_vec().is_empty());
    assert_eq!(
        PreStartContainerResponse::decode(&[][..]),
        Ok(PreStartContainerResponse {})
    );
}

#[test]
fn numa_node_id_is_a_plain_int64_varint_in_field_1() {
    let msg = NumaNode { id: 300 };
    let expected = [
        0x08, 0xac, 0x02, // 1 ID: int64, varint (1<<3|0) = 300 (0b10_0101100 -> 0xac 0x02)
    ];
    assert_wire(&msg, &expected);
}

#[test]
fn topology_info_encodes_each_numa_node_as_field_1() {
    let msg = TopologyInfo {
        nodes: vec![NumaNode { id: 1 }, NumaNode { id: 300 }],
    };
    let expected = [
        0x0a, 0x02, // 1 nodes[0]: NUMANode (1<<3|2), 2 bytes
        0x08, 0x01, //   ID = 1
        0x0a, 0x03, // 1 nodes[1]: NUMANode, 3 bytes
        0x08, 0xac, 0x02, //   ID = 300
    ];
    assert_wire(&msg, &expected);
}

#[test]
fn device_encodes_id_health_and_topology() {
    let msg = Device {
        id: "GPU-0".to_owned(),
        health: HEALTHY.to_owned(),
        topology: Some(TopologyInfo {
            nodes: vec![NumaNode { id: 1 }],
        }),
    };
    let expected = [
        &[0x0a, 0x05][..], // 1 ID: string (1<<3|2), 5 bytes
        b"GPU-0",
        &[0x12, 0x07], // 2 health: string (2<<3|2), 7 bytes
        b"Healthy",
        &[0x1a, 0x04],             // 3 topology: TopologyInfo (3<<3|2), 4 bytes
        &[0x0a, 0x02, 0x08, 0x01], //   nodes[0] = NUMANode{ID: 1}
    ]
    .concat();
    assert_wire(&msg, &expected);
}

#[test]
fn list_and_watch_response_encodes_each_device_as_field_1() {
    let msg = ListAndWatchResponse {
        devices: vec![
            Device {
                id: "a".to_owned(),
                health: UNHEALTHY.to_owned(),
                topology: None,
            },
            Device {
                id: "b".to_owned(),
                health: HEALTHY.to_owned(),
                topology: None,
            },
        ],
    };
    let expected = [
        &[0x0a, 0x0e][..], // 1 devices[0]: Device (1<<3|2), 14 bytes
        &[0x0a, 0x01],     //   ID, 1 byte
        b"a",
        &[0x12, 0x09], //   health, 9 bytes
        b"Unhealthy",
        &[0x0a, 0x0c], // 1 devices[1]: Device, 12 bytes
        &[0x0a, 0x01], //   ID, 1 byte
        b"b",
        &[0x12, 0x07], //   health, 7 bytes
        b"Healthy",
    ]
    .concat();
    assert_wire(&msg, &expected);
}

#[test]
fn pre_start_container_request_encodes_each_device_id_as_field_1() {
    let msg = PreStartContainerRequest {
        devices_ids: vec!["a".to_owned(), "bc".to_owned()],
    };
    let expected = [
        &[0x0a, 0x01][..], // 1 devices_ids[0]: string (1<<3|2), 1 byte
        b"a",
        &[0x0a, 0x02], // 1 devices_ids[1], 2 bytes
        b"bc",
    ]
    .concat();
    assert_wire(&msg, &expected);
}

fn container_preferred_request() -> (ContainerPreferredAllocationRequest, Vec<u8>) {
    let msg = ContainerPreferredAllocationRequest {
        available_device_i_ds: vec!["a".to_owned(), "b".to_owned()],
        must_include_device_i_ds: vec!["b".to_owned()],
        allocation_size: 2,
    };
    let bytes = [
        &[0x0a, 0x01][..], // 1 available_deviceIDs[0]: string (1<<3|2), 1 byte
        b"a",
        &[0x0a, 0x01], // 1 available_deviceIDs[1], 1 byte
        b"b",
        &[0x12, 0x01], // 2 must_include_deviceIDs[0]: string (2<<3|2), 1 byte
        b"b",
        &[0x18, 0x02], // 3 allocation_size: int32, varint (3<<3|0) = 2
    ]
    .concat();
    (msg, bytes)
}

#[test]
fn container_preferred_allocation_request_encodes_available_required_and_size() {
    let (msg, expected) = container_preferred_request();
    assert_eq!(expected.len(), 11);
    assert_wire(&msg, &expected);
}

#[test]
fn preferred_allocation_request_encodes_each_container_as_field_1() {
    let (inner, inner_bytes) = container_preferred_request();
    let msg = PreferredAllocationRequest {
        container_requests: vec![inner],
    };
    let expected = [
        &[0x0a, 0x0b][..], // 1 container_requests[0] (1<<3|2), 11 bytes
        &inner_bytes,
    ]
    .concat();
    assert_wire(&msg, &expected);
}

#[test]
fn container_preferred_allocation_response_encodes_device_ids_as_field_1() {
    let msg = ContainerPreferredAllocationResponse {
        device_i_ds: vec!["b".to_owned(), "a".to_owned()],
    };
    let expected = [
        &[0x0a, 0x01][..], // 1 deviceIDs[0]: string (1<<3|2), 1 byte
        b"b",
        &[0x0a, 0x01], // 1 deviceIDs[1], 1 byte
        b"a",
    ]
    .concat();
    assert_wire(&msg, &expected);
}

#[test]
fn preferred_allocation_response_encodes_each_container_as_field_1() {
    let msg = PreferredAllocationResponse {
        container_responses: vec![ContainerPreferredAllocationResponse {
            device_i_ds: vec!["b".to_owned(), "a".to_owned()],
        }],
    };
    let expected = [
        &[0x0a, 0x06][..], // 1 container_responses[0] (1<<3|2), 6 bytes
        &[0x0a, 0x01],     //   deviceIDs[0], 1 byte
        b"b",
        &[0x0a, 0x01], //   deviceIDs[1], 1 byte
        b"a",
    ]
    .concat();
    assert_wire(&msg, &expected);
}

#[test]
fn container_allocate_request_encodes_device_ids_as_field_1() {
    let msg = ContainerAllocateRequest {
        devices_ids: vec!["GPU-0".to_owned()],
    };
    let expected = [
        &[0x0a, 0x05][..], // 1 devices_ids[0]: string (1<<3|2), 5 bytes
        b"GPU-0",
    ]
    .concat();
    assert_wire(&msg, &expected);
}

#[test]
fn allocate_request_encodes_each_container_as_field_1() {
    let msg = AllocateRequest {
        container_requests: vec![ContainerAllocateRequest {
            devices_ids: vec!["GPU-0".to_owned()],
        }],
    };
    let expected = [
        &[0x0a, 0x07][..], // 1 container_requests[0] (1<<3|2), 7 bytes
        &[0x0a, 0x05],     //   devices_ids[0], 5 bytes
        b"GPU-0",
    ]
    .concat();
    assert_wire(&msg, &expected);
}

#[test]
fn cdi_device_encodes_its_qualified_name_as_field_1() {
    let msg = CdiDevice {
        name: "nvidia.com/gpu=0".to_owned(),
    };
    let expected = [
        &[0x0a, 0x10][..], // 1 name: string (1<<3|2), 16 bytes
        b"nvidia.com/gpu=0",
    ]
    .concat();
    assert_wire(&msg, &expected);
}

fn mount() -> (Mount, Vec<u8>) {
    let msg = Mount {
        container_path: "/c".to_owned(),
        host_path: "/h".to_owned(),
        read_only: true,
    };
    let bytes = [
        &[0x0a, 0x02][..], // 1 container_path: string (1<<3|2), 2 bytes
        b"/c",
        &[0x12, 0x02], // 2 host_path: string (2<<3|2), 2 bytes
        b"/h",
        &[0x18, 0x01], // 3 read_only: bool, varint (3<<3|0) = true
    ]
    .concat();
    (msg, bytes)
}

fn device_spec() -> (DeviceSpec, Vec<u8>) {
    let msg = DeviceSpec {
        container_path: "/dev/x".to_owned(),
        host_path: "/dev/y".to_owned(),
        permissions: "rwm".to_owned(),
    };
    let bytes = [
        &[0x0a, 0x06][..], // 1 container_path: string (1<<3|2), 6 bytes
        b"/dev/x",
        &[0x12, 0x06], // 2 host_path: string (2<<3|2), 6 bytes
        b"/dev/y",
        &[0x1a, 0x03], // 3 permissions: string (3<<3|2), 3 bytes
        b"rwm",
    ]
    .concat();
    (msg, bytes)
}

#[test]
fn mount_encodes_container_path_host_path_and_read_only() {
    let (msg, expected) = mount();
    assert_eq!(expected.len(), 10);
    assert_wire(&msg, &expected);
}

#[test]
fn device_spec_encodes_container_path_host_path_and_permissions() {
    let (msg, expected) = device_spec();
    assert_eq!(expected.len(), 21);
    assert_wire(&msg, &expected);
}

#[test]
fn container_allocate_response_encodes_maps_as_key_1_value_2_entries() {
    let (mount, mount_bytes) = mount();
    let (spec, spec_bytes) = device_spec();
    let msg = ContainerAllocateResponse {
        envs: HashMap::from([("K".to_owned(), "V".to_owned())]),
        mounts: vec![mount],
        devices: vec![spec],
        annotations: HashMap::from([("a".to_owned(), "b".to_owned())]),
        cdi_devices: vec![CdiDevice {
            name: "v/c=n".to_owned(),
        }],
    };
    let expected = [
        &[0x0a, 0x06][..], // 1 envs entry (1<<3|2), 6 bytes
        &[0x0a, 0x01],     //   key (1<<3|2), 1 byte
        b"K",
        &[0x12, 0x01], //   value (2<<3|2), 1 byte
        b"V",
        &[0x12, 0x0a], // 2 mounts[0]: Mount (2<<3|2), 10 bytes
        &mount_bytes,
        &[0x1a, 0x15], // 3 devices[0]: DeviceSpec (3<<3|2), 21 bytes
        &spec_bytes,
        &[0x22, 0x06], // 4 annotations entry (4<<3|2), 6 bytes
        &[0x0a, 0x01], //   key, 1 byte
        b"a",
        &[0x12, 0x01], //   value, 1 byte
        b"b",
        &[0x2a, 0x07], // 5 cdi_devices[0]: CDIDevice (5<<3|2), 7 bytes
        &[0x0a, 0x05], //   name, 5 bytes
        b"v/c=n",
    ]
    .concat();
    assert_eq!(expected.len(), 60);
    assert_wire(&msg, &expected);
}

#[test]
fn allocate_response_encodes_each_container_as_field_1() {
    let msg = AllocateResponse {
        container_responses: vec![ContainerAllocateResponse {
            envs: HashMap::from([("K".to_owned(), "V".to_owned())]),
            ..Default::default()
        }],
    };
    let expected = [
        &[0x0a, 0x08][..], // 1 container_responses[0] (1<<3|2), 8 bytes
        &[0x0a, 0x06],     //   envs entry, 6 bytes
        &[0x0a, 0x01],     //     key, 1 byte
        b"K",
        &[0x12, 0x01], //     value, 1 byte
        b"V",
    ]
    .concat();
    assert_wire(&msg, &expected);
}

#[test]
fn protocol_constants_match_the_kubelet() {
    assert_eq!(VERSION, "v1beta1");
    assert_eq!(SUPPORTED_VERSIONS, ["v1beta1"]);
    assert_eq!(HEALTHY, "Healthy");
    assert_eq!(UNHEALTHY, "Unhealthy");
    assert_eq!(KUBELET_SOCKET, "kubelet.sock");
    assert_eq!(DEVICE_PLUGIN_DIR, "/var/lib/kubelet/device-plugins");
    assert_eq!(PRE_START_TIMEOUT, std::time::Duration::from_secs(30));
}
