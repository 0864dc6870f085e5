//! Rows <-> domain: documents are stored as JSON.

use serde::{Serialize, de::DeserializeOwned};

use crate::{Error, Result};

pub(crate) fn encode_doc<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Internal(format!("encoding a document: {e}")))
}

pub(crate) fn decode_doc<T: DeserializeOwned>(doc: &str) -> Result<T> {
    serde_json::from_str(doc).map_err(|e| Error::Internal(format!("decoding a document: {e}")))
}
