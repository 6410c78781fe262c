use super::*;

#[test]
fn frame_types_keep_their_wire_words() {
    let f: ExecFrame = serde_json::from_str(r#"{"type":"stdout","data":"x"}"#).unwrap();
    assert_eq!(f.r#type, Some(FrameType::Stdout));
    assert_eq!(serde_json::to_value(&f).unwrap()["type"], "stdout");
    let legacy: ExecFrame = serde_json::from_str(r#"{"stdout":"x"}"#).unwrap();
    assert_eq!(legacy.r#type, None);
    assert!(serde_json::to_value(&legacy).unwrap().get("type").is_none());
    let odd: ExecFrame = serde_json::from_str(r#"{"type":"heartbeat"}"#).unwrap();
    assert_eq!(odd.r#type, Some(FrameType::Other));
    assert_eq!(FrameType::from_word("gap"), FrameType::Gap);
    assert_eq!(FrameType::from_word("x\u{0}\n"), FrameType::Other);
}

#[test]
fn a_frame_payload_is_data_or_a_legacy_field_decoded() {
    let f = ExecFrame {
        data: "aGk=".into(),
        encoding: "base64".into(),
        ..Default::default()
    };
    assert_eq!(f.payload().unwrap(), b"hi");
    let f = ExecFrame {
        stderr: "oops".into(),
        ..Default::default()
    };
    assert_eq!((f.payload_text(), f.payload().unwrap()), ("oops", b"oops".to_vec()));
    let f = ExecFrame {
        stdout: "not base64!".into(),
        encoding: "base64".into(),
        ..Default::default()
    };
    assert!(f.payload().is_err());
}

#[test]
fn create_request_rejects_unknown_fields_and_accepts_sdk_ones() {
    let ok: CreateNodeRequest =
        serde_json::from_str(r#"{"tags":["user=alice"],"cpus":1,"ram_bytes":1,"gpu_count":0,"secrets":[]}"#).unwrap();
    assert_eq!(ok.tags, vec!["user=alice"]);
    let err = serde_json::from_str::<CreateNodeRequest>(r#"{"cpu":1}"#).unwrap_err();
    assert!(err.to_string().contains("unknown field `cpu`"));
}

#[test]
fn delete_response_uses_string_flag() {
    let v = serde_json::to_value(DeleteResponse {
        message: "m".into(),
        disk_removed: "true".into(),
        error: String::new(),
    })
    .unwrap();
    assert_eq!(v["disk_removed"], "true");
}
