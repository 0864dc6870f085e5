//! Pages that fit in one response, whatever the backend.

use super::rows;
use crate::{Result, domain::document};

/// Reads a list's rows (a document and where a page after it starts), in
/// order, keeping them while they fit in one response: at most `size` of
/// them, whose wire size (by `measure`) stays within
/// [`document::MAX_PAGE_BYTES`]; the first row is always kept, as each fits
/// alone. Rows are decoded one at a time and the read stops at the first
/// row left out, so a page holds only what it returns, that row, and the
/// few rows the connection reads ahead. The second
/// value is where the next page starts, the last row kept, when rows were
/// left out.
pub(crate) async fn fit_rows<T, K, E>(
    rows: impl futures::Stream<Item = std::result::Result<(String, K), E>>,
    size: u32,
    measure: impl Fn(&T) -> usize,
) -> Result<(Vec<T>, Option<K>)>
where
    T: serde::de::DeserializeOwned,
    E: Into<crate::Error>,
{
    use futures::TryStreamExt;

    let mut rows = std::pin::pin!(rows);
    let mut items = Vec::new();
    let mut bytes = 0;
    let mut last = None;
    while let Some((doc, key)) = rows.try_next().await.map_err(Into::into)? {
        if items.len() >= size as usize {
            return Ok((items, last));
        }
        let item = rows::decode_doc(&doc)?;
        drop(doc);
        let item_bytes = measure(&item);
        if !items.is_empty() && bytes + item_bytes > document::MAX_PAGE_BYTES {
            return Ok((items, last));
        }
        bytes += item_bytes;
        items.push(item);
        last = Some(key);
    }
    Ok((items, None))
}
