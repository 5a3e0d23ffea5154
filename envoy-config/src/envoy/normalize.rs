//! Protobuf-JSON key normalisation (lowerCamelCase -> snake_case) before typed decoding:
//! sources -> **model**.

/// Rewrites every object key that looks like a lowerCamelCase identifier into snake_case,
/// recursively. Keys that are not plain identifiers (`@type`, extension names such as
/// `envoy.extensions.upstreams.http.v3.HttpProtocolOptions`) are kept, so map-typed fields
/// keyed by type names survive.
pub(crate) fn snake_case_keys(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(fields) => serde_json::Value::Object(
            fields
                .into_iter()
                .map(|(key, value)| (snake_case(key), snake_case_keys(value)))
                .collect(),
        ),
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.into_iter().map(snake_case_keys).collect())
        }
        other => other,
    }
}

fn snake_case(key: String) -> String {
    let is_camel_identifier = key.starts_with(|c: char| c.is_ascii_lowercase())
        && key.chars().all(|c| c.is_ascii_alphanumeric())
        && key.chars().any(|c| c.is_ascii_uppercase());
    if !is_camel_identifier {
        return key;
    }
    let mut out = String::with_capacity(key.len() + 4);
    for c in key.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_camel_keys_and_keeps_type_names() {
        let value = serde_json::json!({
            "edsClusterConfig": {"serviceName": "default/echo:8080"},
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {"@type": "x", "explicitHttpConfig": {}}
            },
            "port_value": 80,
            "http2ProtocolOptions": {}
        });
        assert_eq!(
            snake_case_keys(value),
            serde_json::json!({
                "eds_cluster_config": {"service_name": "default/echo:8080"},
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {"@type": "x", "explicit_http_config": {}}
                },
                "port_value": 80,
                "http2_protocol_options": {}
            })
        );
    }
}
