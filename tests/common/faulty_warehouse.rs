//! A real warehouse behind answers an emulator cannot give: BigQuery refusing DML on rows still
//! in its streaming buffer, or refusing every query (a quota). Everything else is the inner
//! warehouse's.

#![allow(dead_code)] // each test crate uses the faults it needs

use cohort_adapters::{
    BronzeRow, DeleteOutcome, GoldProfileRow, Layer, QueryResult, QueryValue, SilverRow, StoreError, Warehouse,
};
use cohort_messages::ProfileId;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

pub struct FaultyWarehouse {
    pub inner: Arc<dyn Warehouse>,
    /// `delete_profile` answers "rows still in the streaming buffer" this many more times.
    pub streaming_buffer_refusals: AtomicU32,
    /// Every query fails with this message.
    pub query_error: Option<String>,
}

impl FaultyWarehouse {
    /// A `SystemOptions::warehouse_wrapper` installing these faults.
    pub fn wrapper(refusals: u32, query_error: Option<&str>) -> cohort::system::WarehouseWrapper {
        let query_error = query_error.map(str::to_string);
        Arc::new(move |inner| {
            Arc::new(FaultyWarehouse {
                inner,
                streaming_buffer_refusals: AtomicU32::new(refusals),
                query_error: query_error.clone(),
            })
        })
    }
}

#[async_trait::async_trait]
impl Warehouse for FaultyWarehouse {
    async fn ensure_schema(&self) -> Result<(), StoreError> {
        self.inner.ensure_schema().await
    }
    async fn write_bronze(&self, rows: Vec<BronzeRow>) -> Result<(), StoreError> {
        self.inner.write_bronze(rows).await
    }
    fn max_raw_payload_bytes(&self) -> Option<usize> {
        self.inner.max_raw_payload_bytes()
    }
    async fn write_silver(&self, rows: Vec<SilverRow>) -> Result<(), StoreError> {
        self.inner.write_silver(rows).await
    }
    async fn write_gold_profiles(&self, rows: Vec<GoldProfileRow>) -> Result<(), StoreError> {
        self.inner.write_gold_profiles(rows).await
    }
    async fn query(&self, sql: &str, params: &[(String, QueryValue)]) -> Result<QueryResult, StoreError> {
        match &self.query_error {
            Some(e) => Err(StoreError::unavailable(e.clone())),
            None => self.inner.query(sql, params).await,
        }
    }
    async fn delete_profile(&self, profile_id: &ProfileId) -> Result<DeleteOutcome, StoreError> {
        let refused =
            self.streaming_buffer_refusals.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if refused.is_ok() {
            return Ok(DeleteOutcome {
                rows_deleted: 0,
                retry_later: true,
                detail: "silver: rows still in the streaming buffer, retry later".into(),
            });
        }
        self.inner.delete_profile(profile_id).await
    }
    async fn raw_payloads(&self, after: u64, limit: usize) -> Result<Vec<(u64, String)>, StoreError> {
        self.inner.raw_payloads(after, limit).await
    }
    async fn delete_raw(&self, seqs: &[u64]) -> Result<DeleteOutcome, StoreError> {
        self.inner.delete_raw(seqs).await
    }
    async fn count_rows(&self, layer: Layer) -> Result<u64, StoreError> {
        self.inner.count_rows(layer).await
    }
    fn table(&self, layer: Layer) -> String {
        self.inner.table(layer)
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn runs_in_process(&self) -> bool {
        self.inner.runs_in_process()
    }
}
