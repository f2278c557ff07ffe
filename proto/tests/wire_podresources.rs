//! Wire compatibility of the pod-resources v1 messages with the kubelet.
//!
//! Every expected byte string below was computed by hand from the field tables of the kubelet
//! API (tag byte = field_number << 3 | wire_type; wire type 0 = varint, 2 = length-delimited;
//! proto3 packs repeated int64 into one length-delimited field), so a wrong field number or
//! field type in our `.proto` fails these tests.

use std::fmt::Debug;

use gm_proto::podresources::v1::*;
use prost::Message;

/// Encodes `msg` and compares with `expected`, then decodes `expected` and compares with `msg`.
fn assert_wire<M: Message + Default + PartialEq + Debug>(msg: &M, expected: &[u8]) {
    let name = std::any::type_name::<M>();
    assert_eq!(msg.encode_to_vec(), expected, "encoding of {name}");
    let decoded = M::decode(expected).unwrap_or_else(|e| panic!("decoding {name}: {e}"));
    assert_eq!(&decoded, msg, "decoding of {name}");
}

fn numa1() -> Option<TopologyInfo> {
    Some(TopologyInfo {
        nodes: vec![NumaNode { id: 1 }],
    })
}

/// TopologyInfo{nodes: [NUMANode{ID: 1}]}: nodes (1<<3|2), 2 bytes, then ID (1<<3|0) = 1.
const NUMA1_BYTES: [u8; 4] = [0x0a, 0x02, 0x08, 0x01];

/// A small ContainerDevices used inside bigger messages, with its 16 encoded bytes.
fn small_devices() -> (ContainerDevices, Vec<u8>) {
    let msg = ContainerDevices {
        resource_name: "x/gpu".to_owned(),
        device_ids: vec!["a".to_owned()],
        topology: numa1(),
    };
    let bytes = [
        &[0x0a, 0x05][..], // 1 resource_name (1<<3|2), 5 bytes
        b"x/gpu",
        &[0x12, 0x01], // 2 device_ids[0] (2<<3|2), 1 byte
        b"a",
        &[0x1a, 0x04], // 3 topology (3<<3|2), 4 bytes
        &NUMA1_BYTES,
    ]
    .concat();
    (msg, bytes)
}

/// A small ContainerMemory used inside bigger messages, with its 5 encoded bytes.
fn small_memory() -> (ContainerMemory, Vec<u8>) {
    let msg = ContainerMemory {
        memory_type: "m".to_owned(),
        size: 1,
        topology: None,
    };
    let bytes = [
        &[0x0a, 0x01][..], // 1 memory_type (1<<3|2), 1 byte
        b"m",
        &[0x10, 0x01], // 2 size: uint64, varint (2<<3|0) = 1
    ]
    .concat();
    (msg, bytes)
}

#[test]
fn request_messages_without_fields_encode_to_no_bytes() {
    assert!(AllocatableResourcesRequest {}.encode_to_vec().is_empty());
    assert!(ListPodResourcesRequest {}.encode_to_vec().is_empty());
    assert_eq!(
        AllocatableResourcesRequest::decode(&[][..]),
        Ok(AllocatableResourcesRequest {})
    );
    assert_eq!(
        ListPodResourcesRequest::decode(&[][..]),
        Ok(ListPodResourcesRequest {})
    );
}

#[test]
fn numa_node_id_is_a_plain_int64_varint_in_field_1() {
    let msg = NumaNode { id: 300 };
    let expected = [
        0x08, 0xac, 0x02, // 1 ID: int64, varint (1<<3|0) = 300
    ];
    assert_wire(&msg, &expected);
}

#[test]
fn topology_info_encodes_each_numa_node_as_field_1() {
    let msg = TopologyInfo {
        nodes: vec![NumaNode { id: 1 }, NumaNode { id: 300 }],
    };
    let expected = [
        0x0a, 0x02, // 1 nodes[0] (1<<3|2), 2 bytes
        0x08, 0x01, //   ID = 1
        0x0a, 0x03, // 1 nodes[1], 3 bytes
        0x08, 0xac, 0x02, //   ID = 300
    ];
    assert_wire(&msg, &expected);
}

#[test]
fn cdi_device_encodes_its_name_as_field_1() {
    let msg = CdiDevice {
        name: "v/c=n".to_owned(),
    };
    let expected = [
        &[0x0a, 0x05][..], // 1 name: string (1<<3|2), 5 bytes
        b"v/c=n",
    ]
    .concat();
    assert_wire(&msg, &expected);
}

#[test]
fn container_devices_encode_resource_ids_and_topology() {
    let msg = ContainerDevices {
        resource_name: "tencent.com/vcuda-core".to_owned(),
        device_ids: vec!["a".to_owned(), "b".to_owned()],
        topology: numa1(),
    };
    let expected = [
        &[0x0a, 0x16][..], // 1 resource_name: string (1<<3|2), 22 bytes
        b"tencent.com/vcuda-core",
        &[0x12, 0x01], // 2 device_ids[0]: string (2<<3|2), 1 byte
        b"a",
        &[0x12, 0x01], // 2 device_ids[1], 1 byte
        b"b",
        &[0x1a, 0x04], // 3 topology: TopologyInfo (3<<3|2), 4 bytes
        &NUMA1_BYTES,
    ]
    .concat();
    assert_wire(&msg, &expected);
    let (small, small_bytes) = small_devices();
    assert_eq!(small_bytes.len(), 16);
    assert_wire(&small, &small_bytes);
}

#[test]
fn container_memory_encodes_type_size_as_uint64_and_topology() {
    let msg = ContainerMemory {
        memory_type: "memory".to_owned(),
        size: 1 << 34, // 16 GiB
        topology: numa1(),
    };
    let expected = [
        &[0x0a, 0x06][..], // 1 memory_type: string (1<<3|2), 6 bytes
        b"memory",
        &[0x10],                         // 2 size: uint64, varint (2<<3|0)
        &[0x80, 0x80, 0x80, 0x80, 0x40], //   2^34: four empty 7-bit groups, then 0x40
        &[0x1a, 0x04],                   // 3 topology: TopologyInfo (3<<3|2), 4 bytes
        &NUMA1_BYTES,
    ]
    .concat();
    assert_wire(&msg, &expected);
    let (small, small_bytes) = small_memory();
    assert_eq!(small_bytes.len(), 5);
    assert_wire(&small, &small_bytes);
}

#[test]
fn allocatable_resources_response_packs_cpu_ids_in_field_2() {
    let (devices, devices_bytes) = small_devices();
    let (memory, memory_bytes) = small_memory();
    let msg = AllocatableResourcesResponse {
        devices: vec![devices],
        cpu_ids: vec![1, 300],
        memory: vec![memory],
    };
    let expected = [
        &[0x0a, 0x10][..], // 1 devices[0]: ContainerDevices (1<<3|2), 16 bytes
        &devices_bytes,
        &[0x12, 0x03],       // 2 cpu_ids: packed int64 (2<<3|2), 3 bytes
        &[0x01, 0xac, 0x02], //   1, 300
        &[0x1a, 0x05],       // 3 memory[0]: ContainerMemory (3<<3|2), 5 bytes
        &memory_bytes,
    ]
    .concat();
    assert_wire(&msg, &expected);
}

#[test]
fn cpu_ids_sent_unpacked_still_decode() {
    let unpacked = [
        0x10, 0x01, // 2 cpu_ids: int64, varint (2<<3|0) = 1
        0x10, 0xac, 0x02, // 2 cpu_ids: int64, varint = 300
    ];
    let decoded = AllocatableResourcesResponse::decode(&unpacked[..]);
    assert_eq!(
        decoded.map(|m| m.cpu_ids),
        Ok(vec![1, 300]),
        "unpacked repeated int64 must decode"
    );
}

fn claim_resource() -> (ClaimResource, Vec<u8>) {
    let msg = ClaimResource {
        cdi_devices: vec![CdiDevice {
            name: "v/c=n".to_owned(),
        }],
        driver_name: "d".to_owned(),
        pool_name: "p".to_owned(),
        device_name: "g".to_owned(),
        share_id: Some("s".to_owned()),
    };
    let bytes = [
        &[0x0a, 0x07][..], // 1 cdi_devices[0]: CDIDevice (1<<3|2), 7 bytes
        &[0x0a, 0x05],     //   name, 5 bytes
        b"v/c=n",
        &[0x12, 0x01], // 2 driver_name: string (2<<3|2), 1 byte
        b"d",
        &[0x1a, 0x01], // 3 pool_name: string (3<<3|2), 1 byte
        b"p",
        &[0x22, 0x01], // 4 device_name: string (4<<3|2), 1 byte
        b"g",
        &[0x2a, 0x01], // 5 share_id: optional string (5<<3|2), 1 byte
        b"s",
    ]
    .concat();
    (msg, bytes)
}

#[test]
fn claim_resource_encodes_cdi_devices_driver_pool_device_and_share_id() {
    let (msg, expected) = claim_resource();
    assert_eq!(expected.len(), 21);
    assert_wire(&msg, &expected);
}

#[test]
fn claim_resource_share_id_is_optional_with_presence() {
    // proto3 `optional`: an empty string that is set is still sent; an unset one is not.
    let set_empty = ClaimResource {
        share_id: Some(String::new()),
        ..Default::default()
    };
    assert_wire(&set_empty, &[0x2a, 0x00]); // 5 share_id (5<<3|2), 0 bytes
    let unset = ClaimResource::default();
    assert_wire(&unset, &[]);
}

#[test]
fn dynamic_resource_encodes_claim_name_namespace_and_resources_from_field_2() {
    let msg = DynamicResource {
        claim_name: "c".to_owned(),
        claim_namespace: "n".to_owned(),
        claim_resources: vec![ClaimResource {
            driver_name: "d".to_owned(),
            ..Default::default()
        }],
    };
    let expected = [
        &[0x12, 0x01][..], // 2 claim_name: string (2<<3|2), 1 byte
        b"c",
        &[0x1a, 0x01], // 3 claim_namespace: string (3<<3|2), 1 byte
        b"n",
        &[0x22, 0x03], // 4 claim_resources[0]: ClaimResource (4<<3|2), 3 bytes
        &[0x12, 0x01], //   driver_name, 1 byte
        b"d",
    ]
    .concat();
    assert_wire(&msg, &expected);
}

#[test]
fn dynamic_resource_ignores_the_removed_class_name_field_1() {
    // An older kubelet still sends class_name in field 1; it must be skipped, not misread.
    let old = [
        &[0x0a, 0x03][..], // 1 class_name (removed): string, 3 bytes
        b"cls",
        &[0x12, 0x01], // 2 claim_name, 1 byte
        b"c",
    ]
    .concat();
    let expected = DynamicResource {
        claim_name: "c".to_owned(),
        ..Default::default()
    };
    assert_eq!(DynamicResource::decode(&old[..]), Ok(expected));
}

fn container_resources() -> (ContainerResources, Vec<u8>) {
    let (devices, devices_bytes) = small_devices();
    let (memory, memory_bytes) = small_memory();
    let msg = ContainerResources {
        name: "ctr".to_owned(),
        devices: vec![devices],
        cpu_ids: vec![2, 3],
        memory: vec![memory],
        dynamic_resources: vec![DynamicResource {
            claim_name: "c".to_owned(),
            ..Default::default()
        }],
    };
    let bytes = [
        &[0x0a, 0x03][..], // 1 name: string (1<<3|2), 3 bytes
        b"ctr",
        &[0x12, 0x10], // 2 devices[0]: ContainerDevices (2<<3|2), 16 bytes
        &devices_bytes,
        &[0x1a, 0x02, 0x02, 0x03], // 3 cpu_ids: packed int64 (3<<3|2), 2 bytes: 2, 3
        &[0x22, 0x05],             // 4 memory[0]: ContainerMemory (4<<3|2), 5 bytes
        &memory_bytes,
        &[0x2a, 0x03], // 5 dynamic_resources[0]: DynamicResource (5<<3|2), 3 bytes
        &[0x12, 0x01], //   claim_name, 1 byte
        b"c",
    ]
    .concat();
    (msg, bytes)
}

#[test]
fn container_resources_encode_name_devices_cpus_memory_and_claims() {
    let (msg, expected) = container_resources();
    assert_eq!(expected.len(), 39);
    assert_wire(&msg, &expected);
}

#[test]
fn pod_resources_encode_name_namespace_containers_and_pod_level_cpus_and_memory() {
    let (memory, memory_bytes) = small_memory();
    let msg = PodResources {
        name: "p".to_owned(),
        namespace: "ns".to_owned(),
        containers: vec![ContainerResources {
            name: "c".to_owned(),
            ..Default::default()
        }],
        cpu_ids: vec![4],
        memory: vec![memory],
    };
    let expected = [
        &[0x0a, 0x01][..], // 1 name: string (1<<3|2), 1 byte
        b"p",
        &[0x12, 0x02], // 2 namespace: string (2<<3|2), 2 bytes
        b"ns",
        &[0x1a, 0x03], // 3 containers[0]: ContainerResources (3<<3|2), 3 bytes
        &[0x0a, 0x01], //   name, 1 byte
        b"c",
        &[0x22, 0x01, 0x04], // 4 cpu_ids: packed int64 (4<<3|2), 1 byte: 4
        &[0x2a, 0x05],       // 5 memory[0]: ContainerMemory (5<<3|2), 5 bytes
        &memory_bytes,
    ]
    .concat();
    assert_eq!(expected.len(), 22);
    assert_wire(&msg, &expected);
}

fn small_pod() -> (PodResources, Vec<u8>) {
    let msg = PodResources {
        name: "p".to_owned(),
        namespace: "ns".to_owned(),
        ..Default::default()
    };
    let bytes = [
        &[0x0a, 0x01][..], // 1 name, 1 byte
        b"p",
        &[0x12, 0x02], // 2 namespace, 2 bytes
        b"ns",
    ]
    .concat();
    (msg, bytes)
}

#[test]
fn list_pod_resources_response_encodes_each_pod_as_field_1() {
    let (pod, pod_bytes) = small_pod();
    let msg = ListPodResourcesResponse {
        pod_resources: vec![pod],
    };
    let expected = [
        &[0x0a, 0x07][..], // 1 pod_resources[0]: PodResources (1<<3|2), 7 bytes
        &pod_bytes,
    ]
    .concat();
    assert_wire(&msg, &expected);
}

#[test]
fn get_pod_resources_request_encodes_pod_name_and_namespace() {
    let msg = GetPodResourcesRequest {
        pod_name: "p".to_owned(),
        pod_namespace: "ns".to_owned(),
    };
    let expected = [
        &[0x0a, 0x01][..], // 1 pod_name: string (1<<3|2), 1 byte
        b"p",
        &[0x12, 0x02], // 2 pod_namespace: string (2<<3|2), 2 bytes
        b"ns",
    ]
    .concat();
    assert_wire(&msg, &expected);
}

#[test]
fn get_pod_resources_response_encodes_the_pod_as_field_1() {
    let (pod, pod_bytes) = small_pod();
    let msg = GetPodResourcesResponse {
        pod_resources: Some(pod),
    };
    let expected = [
        &[0x0a, 0x07][..], // 1 pod_resources: PodResources (1<<3|2), 7 bytes
        &pod_bytes,
    ]
    .concat();
    assert_wire(&msg, &expected);
}

#[test]
fn default_socket_is_the_kubelet_pod_resources_socket() {
    assert_eq!(
        DEFAULT_SOCKET,
        "/var/lib/kubelet/pod-resources/kubelet.sock"
    );
}
