//! `/proxy/v1`: Slicer Proxy's admin shapes (clients, upstream credentials, allow rules), as
//! SlicerVM's OpenAPI document and Go SDK (`proxy.go`) spell them.

use serde::{Deserialize, Serialize};

/// A proxy client as `GET /proxy/v1/clients` lists it (never its token).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProxyClient {
    pub name: String,
    /// RFC 3339.
    pub created_at: String,
}

/// `POST /proxy/v1/clients` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateProxyClientRequest {
    pub name: String,
    /// A literal token to register; when absent the daemon mints `spt_…` (`null` is refused:
    /// the schema says string).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "string_not_null"
    )]
    pub token: Option<String>,
}

/// The answer to a client create: the only time the token is shown.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProxyClientCreated {
    pub name: String,
    pub token: String,
    pub created_at: String,
}

/// An upstream credential as listed (never its value).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProxySecret {
    pub name: String,
    pub host: String,
    /// `bearer` or `basic`.
    #[serde(rename = "type", default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

/// `POST /proxy/v1/secrets` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateProxySecretRequest {
    pub name: String,
    pub host: String,
    /// Empty means `bearer`.
    #[serde(rename = "type", default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    pub value: String,
    /// Where the CLI read the value from (informational; the daemon never opens it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source_file: String,
    /// Replace a secret of the same name.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// One allow rule of a client, in declaration order (`GET /proxy/v1/clients/{name}`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProxyAllowRule {
    pub host: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Empty means 80 and 443.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// RFC 3339; absent = never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub passthrough: bool,
}

/// `POST /proxy/v1/allows` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AddProxyAllowRequest {
    pub client: String,
    pub host: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// 0 or absent: never expires.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ttl_seconds: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub passthrough: bool,
}

/// `POST /proxy/v1/allows/revoke` body: removes the one rule with this identity.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RemoveProxyAllowByTupleRequest {
    pub client: String,
    pub host: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub passthrough: bool,
}

/// A field that may be absent but, when present, must be a string (not `null`).
fn string_not_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    String::deserialize(d).map(Some)
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_null_token_is_refused_an_absent_one_minted() {
        assert!(serde_json::from_str::<CreateProxyClientRequest>(r#"{"name":"a","token":null}"#).is_err());
        let r: CreateProxyClientRequest = serde_json::from_str(r#"{"name":"a"}"#).unwrap();
        assert_eq!(r.token, None);
        let r: CreateProxyClientRequest = serde_json::from_str(r#"{"name":"a","token":"spt_x"}"#).unwrap();
        assert_eq!(r.token.as_deref(), Some("spt_x"));
    }
}

/// `proxy` of a create request (a slicer extension): the proxy client a VM acts as.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProxyBinding {
    pub client: String,
}
