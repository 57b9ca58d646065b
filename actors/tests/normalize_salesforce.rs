//! Salesforce Change Data Capture and Bulk API 2.0 CSV normalization.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use chrono::{DateTime, TimeZone, Utc};
use cohort_actors::normalize::{normalize, normalize_csv_record, NormalizeError, NormalizeOptions, Normalized};
use cohort_messages::msgs::{PayloadFormat, RawPayload};
use cohort_messages::{EventId, EventKind, Identifier, IdentifierKind, Source};
use serde_json::{json, Value};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn received() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 2, 13, 0, 0).unwrap()
}

fn run(format: PayloadFormat, body: Vec<u8>) -> Result<Normalized, NormalizeError> {
    let p = RawPayload {
        source: Source::Crm,
        format,
        body: body.into(),
        content_type: String::new(),
        received_at: received(),
    };
    normalize(&p, &NormalizeOptions::default())
}

fn cdc(body: Vec<u8>) -> Result<Normalized, NormalizeError> {
    run(PayloadFormat::SalesforceCdc, body)
}

fn csv(body: &[u8]) -> Result<Normalized, NormalizeError> {
    run(PayloadFormat::SalesforceCsv, body.to_vec())
}

fn has(ids: &[Identifier], kind: IdentifierKind, value: &str) -> bool {
    ids.contains(&Identifier::new(kind, value))
}

// ------------------------------------------------------------------------------------ CDC

#[test]
fn cdc_create_maps_fields_to_traits_and_identifiers() {
    let out = cdc(fixture("salesforce_cdc_create.json")).unwrap();
    assert!(out.rejected.is_empty());
    let [e] = out.events.as_slice() else { panic!("{out:?}") };
    assert_eq!(e.event_id, EventId::new(Source::Crm, "cdc:1434298:003Dp000004XyZ1IAK"));
    assert_eq!(e.kind, EventKind::ContactChanged);
    assert_eq!(e.source, Source::Crm);
    assert_eq!(e.occurred_at, Utc.with_ymd_and_hms(2026, 11, 2, 9, 0, 0).unwrap(), "commitTimestamp in ms");
    assert_eq!(e.received_at, received());
    assert!(has(&e.identifiers, IdentifierKind::SalesforceId, "003Dp000004XyZ1IAK"));
    // The identifier is the Gmail mailbox (dots ignored); the trait keeps the address as written.
    assert!(has(&e.identifiers, IdentifierKind::Email, "maxmustermann@gmail.com"));
    assert!(has(&e.identifiers, IdentifierKind::Phone, "+493012345678"));
    assert!(has(&e.identifiers, IdentifierKind::Phone, "+4915123456789"), "MobilePhone is an identifier too");
    assert!(has(&e.identifiers, IdentifierKind::Email, "m.mustermann@student.example-university.de"));
    let t = &e.traits;
    assert_eq!(t["first_name"], json!("Maximilian"));
    assert_eq!(t["last_name"], json!("Mustermann"));
    assert_eq!(t["salutation"], json!("Herr"));
    assert_eq!(t["email"], json!("max.mustermann@gmail.com"));
    assert_eq!(t["phone"], json!("+493012345678"));
    assert_eq!(t["mobile_phone"], json!("+4915123456789"));
    assert_eq!(t["preferred_email"], json!("Personal Email"), "EDA's picklist is kept, not an identifier");
    assert_eq!(t["enrollment_status"], json!("inquiry"));
    assert_eq!(t["application_stage"], json!("Lead"));
    assert_eq!(t["has_opted_out_of_email"], json!(false));
    assert_eq!(t["city"], json!("Berlin"));
    assert_eq!(t["street"], json!("Invalidenstraße 117"));
    assert_eq!(t["Campus__c"], json!("Berlin Mitte"), "unknown fields keep their API names");
    assert_eq!(t["owner_id"], json!("005Dp000001Qw3xIAC"));
    assert!(!t.contains_key("Birthdate") && !t.contains_key("birthdate"), "null fields of a CREATE are absent values");
    assert!(!t.contains_key("LastModifiedDate"), "audit fields are properties");
    let p = &e.properties;
    assert_eq!(p["change_type"], json!("CREATE"));
    assert_eq!(p["entity_name"], json!("Contact"));
    assert_eq!(p["replay_id"], json!("1434298"));
    assert_eq!(p["channel"], json!("/data/ContactChangeEvent"));
    assert_eq!(p["record_id"], json!("003Dp000004XyZ1IAK"));
    assert_eq!(p["LastModifiedDate"], json!("2026-11-02T09:00:00.000Z"));
    assert!(!p.contains_key("consent_change"), "a new contact is not an opt-in");
}

#[test]
fn cdc_update_carries_only_changed_fields_and_nulls() {
    let out = cdc(fixture("salesforce_cdc_update.json")).unwrap();
    let [e] = out.events.as_slice() else { panic!("{out:?}") };
    assert_eq!(e.event_id.as_str(), "crm:cdc:1434305:003Dp000004XyZ1IAK");
    let mut keys: Vec<&str> = e.traits.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, vec!["application_stage", "enrollment_status", "first_name", "mobile_phone"]);
    assert_eq!(e.traits["application_stage"], json!("Application Submitted"));
    assert_eq!(e.traits["first_name"], json!("Max"));
    assert_eq!(e.traits["mobile_phone"], Value::Null, "nulledFields set the trait to null");
    assert_eq!(e.identifiers, vec![Identifier::new(IdentifierKind::SalesforceId, "003Dp000004XyZ1IAK")]);
    assert_eq!(
        e.properties["changed_fields"],
        json!(["Application_Stage__c", "Enrollment_Status__c", "MobilePhone", "Name.FirstName", "LastModifiedDate"])
    );
    assert_eq!(e.properties["nulled_fields"], json!(["MobilePhone"]));
}

#[test]
fn cdc_delete_and_gap_events() {
    let out = cdc(fixture("salesforce_cdc_delete.json")).unwrap();
    let e = &out.events[0];
    assert_eq!(e.kind, EventKind::ContactDeleted);
    assert_eq!(e.identifiers, vec![Identifier::new(IdentifierKind::SalesforceId, "003Dp000004Old1IAC")]);
    assert!(e.traits.is_empty());
    assert_eq!(e.properties["change_type"], json!("DELETE"));

    let out = cdc(fixture("salesforce_cdc_gap.json")).unwrap();
    assert_eq!(out.events.len(), 2);
    for (i, (e, id)) in out.events.iter().zip(["003Dp000004GapAIAS", "003Dp000004GapBIAS"]).enumerate() {
        assert_eq!(e.kind, EventKind::ContactGap);
        assert!(e.traits.is_empty(), "gap events carry no values even when fields appear as null");
        assert_eq!(e.identifiers, vec![Identifier::new(IdentifierKind::SalesforceId, id)]);
        assert_eq!(e.properties["reread_record_ids"], json!([id]));
        assert_eq!(e.properties["change_type"], json!("GAP_UPDATE"));
        assert_eq!(e.raw.index as usize, i);
        assert_eq!(e.event_id.as_str(), format!("crm:cdc:1434420:{id}"));
    }

    let out = cdc(fixture("salesforce_cdc_overflow.json")).unwrap();
    let [e] = out.events.as_slice() else { panic!("{out:?}") };
    assert_eq!(e.kind, EventKind::ContactGap);
    assert!(e.identifiers.is_empty());
    assert_eq!(e.properties["reread_all"], json!(true));
    assert_eq!(e.properties["entity_name"], json!("Contact"));
}

#[test]
fn cdc_with_several_record_ids_is_one_event_per_record() {
    let out = cdc(fixture("salesforce_cdc_multi.json")).unwrap();
    assert_eq!(out.events.len(), 3);
    let ids: Vec<&str> = out.events.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(
        ids,
        vec![
            "crm:cdc:1434500:003Dp000004Aaa1IAC",
            "crm:cdc:1434500:003Dp000004Bbb2IAC",
            "crm:cdc:1434500:003Dp000004Ccc3IAC"
        ]
    );
    for (i, e) in out.events.iter().enumerate() {
        assert_eq!(e.traits["enrollment_status"], json!("enrolled"));
        assert_eq!(e.raw.index as usize, i);
        assert_eq!(e.identifiers.len(), 1);
        assert_eq!(e.properties["record_ids"].as_array().map(Vec::len), Some(3));
    }
}

#[test]
fn cdc_envelope_variants_and_fallback_ids() {
    let header = json!({"entityName": "Contact", "recordIds": ["003A"], "changeType": "UPDATE",
        "transactionKey": "tx-1", "sequenceNumber": 4, "commitTimestamp": 1793613600000_i64,
        "changedFields": ["HasOptedOutOfEmail"], "nulledFields": []});
    // without the `data` wrapper
    let bare = json!({"payload": {"ChangeEventHeader": header, "HasOptedOutOfEmail": true}, "event": {"replayId": 7}});
    let out = cdc(serde_json::to_vec(&bare).unwrap()).unwrap();
    assert_eq!(out.events[0].event_id.as_str(), "crm:cdc:7:003A");
    assert_eq!(out.events[0].properties["consent_change"], json!({"channel": "email", "status": "opted_out"}));
    // the bare payload, no replay id: transaction key and sequence number
    let payload = json!({"ChangeEventHeader": header, "HasOptedOutOfEmail": false});
    let out = cdc(serde_json::to_vec(&payload).unwrap()).unwrap();
    assert_eq!(out.events[0].event_id.as_str(), "crm:cdc:tx-1:4:003A");
    assert_eq!(out.events[0].properties["consent_change"], json!({"channel": "email", "status": "opted_in"}));
    // replay ids as strings (Pub/Sub API) work too
    let s = json!({"data": {"payload": {"ChangeEventHeader": header}, "event": {"replayId": "AAAAAAAB2xA="}}});
    assert_eq!(cdc(serde_json::to_vec(&s).unwrap()).unwrap().events[0].event_id.as_str(), "crm:cdc:AAAAAAAB2xA=:003A");
}

#[test]
fn cdc_wildcard_record_ids_mean_reread_everything() {
    let body = json!({"data": {"payload": {"ChangeEventHeader": {"entityName": "Contact", "recordIds": ["003*"], "changeType": "GAP_UPDATE"}}, "event": {"replayId": 9}}});
    let out = cdc(serde_json::to_vec(&body).unwrap()).unwrap();
    let e = &out.events[0];
    assert!(e.identifiers.is_empty());
    assert_eq!(e.properties["key_prefix"], json!("003"));
    assert_eq!(e.properties["reread_all"], json!(true));
}

#[test]
fn cdc_malformed_payloads_are_errors() {
    for body in [
        json!({"data": {"payload": {}}}),
        json!({"data": {"schema": "x"}}),
        json!({"data": {"payload": {"ChangeEventHeader": "nope"}}}),
        json!({"data": {"payload": {"ChangeEventHeader": {"recordIds": ["003A"]}}}}),
        json!({"data": {"payload": {"ChangeEventHeader": {"recordIds": ["003A"], "changeType": "MERGE"}}}}),
        json!({"data": {"payload": {"ChangeEventHeader": {"changeType": "UPDATE"}}}}),
        json!({"data": {"payload": {"ChangeEventHeader": {"recordIds": [], "changeType": "UPDATE"}}}}),
        json!({"data": {"payload": {"ChangeEventHeader": {"recordIds": "003A", "changeType": "UPDATE"}}}}),
        json!([1, 2]),
    ] {
        let r = cdc(serde_json::to_vec(&body).unwrap());
        assert!(matches!(r, Err(NormalizeError::SalesforceCdc(_))), "{body}: {r:?}");
    }
    assert!(matches!(cdc(b"{\"data\":".to_vec()), Err(NormalizeError::Malformed { .. })));
    // a bad record id entry rejects that record only
    let body = json!({"data": {"payload": {"ChangeEventHeader": {"recordIds": ["003A", 5, ""], "changeType": "DELETE"}}, "event": {"replayId": 1}}});
    let out = cdc(serde_json::to_vec(&body).unwrap()).unwrap();
    assert_eq!(out.events.len(), 1);
    assert_eq!(out.rejected.iter().map(|r| r.index).collect::<Vec<_>>(), vec![Some(1), Some(2)]);
}

// ------------------------------------------------------------------------------------ CSV

#[test]
fn csv_comma_with_quotes_and_bad_rows() {
    let out = csv(&fixture("salesforce_contacts.csv")).unwrap();
    assert_eq!(out.events.len(), 3, "{:?}", out.rejected);
    assert_eq!(out.rejected.iter().map(|r| r.index).collect::<Vec<_>>(), vec![Some(2), Some(3)]);
    assert!(out.rejected[0].reason.contains("columns"));
    assert!(out.rejected[1].reason.contains("Id"));

    let max = &out.events[0];
    assert_eq!(max.kind, EventKind::ContactChanged);
    assert_eq!(max.source, Source::Crm);
    let id = max.event_id.as_str();
    assert!(id.starts_with("crm:csv:003Dp000004XyZ1IAK:2026-11-02T10:00:00.000+0000:c"), "{id}");
    assert_eq!(max.occurred_at, Utc.with_ymd_and_hms(2026, 11, 2, 10, 0, 0).unwrap());
    assert!(has(&max.identifiers, IdentifierKind::SalesforceId, "003Dp000004XyZ1IAK"));
    assert!(has(&max.identifiers, IdentifierKind::Email, "maxmustermann@gmail.com"));
    assert!(has(&max.identifiers, IdentifierKind::Phone, "+4915123456789"));
    assert_eq!(max.traits["first_name"], json!("Maximilian"));
    assert_eq!(max.traits["application_stage"], json!("Application Submitted"));
    assert_eq!(max.traits["has_opted_out_of_email"], json!(false));
    assert_eq!(max.traits["Campus__c"], json!("Berlin Mitte"));
    assert!(!max.traits.contains_key("individual_id"), "empty cells are skipped");
    assert!(!max.properties.contains_key("consent_change"));
    assert_eq!(max.raw.index, 0);

    let lena = &out.events[1];
    assert_eq!(lena.traits["last_name"], json!("Schmidt, geb. Müller"));
    assert_eq!(lena.traits["Campus__c"], json!("Hamburg \"Hafencity\""));
    assert_eq!(lena.traits["mobile_phone"], json!("+491701234567"));
    assert!(!lena.traits.contains_key("phone"));
    assert_eq!(lena.properties["consent_change"], json!({"channel": "email", "status": "opted_out"}));
    assert_eq!(lena.raw.index, 1);

    let jonas = &out.events[2];
    assert_eq!(jonas.raw.index, 4);
    assert_eq!(jonas.traits["phone_raw"], json!("0176 ABC"));
    assert!(!jonas.identifiers.iter().any(|i| i.kind == IdentifierKind::Phone));
    assert_eq!(jonas.occurred_at, received(), "no LastModifiedDate: the receipt time");
    assert!(jonas.event_id.as_str().starts_with("crm:csv:003Dp000004Jonas3IAC:h"), "{}", jonas.event_id);
    // the content-hash id is stable across imports
    assert_eq!(csv(&fixture("salesforce_contacts.csv")).unwrap().events[2].event_id, jonas.event_id);
}

#[test]
fn csv_semicolon_crlf_with_a_short_row() {
    let body = fixture("salesforce_contacts_semicolon_crlf.csv");
    assert!(body.windows(2).any(|w| w == b"\r\n"), "the fixture must keep its CRLF line endings");
    let out = csv(&body).unwrap();
    assert_eq!(out.events.len(), 3);
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(out.rejected[0].index, Some(2));
    let sophie = &out.events[0];
    let id = sophie.event_id.as_str();
    assert!(id.starts_with("crm:csv:003Dp000004Semi1AAA:2026-11-01T10:00:00.000Z:c"), "{id}");
    assert_eq!(sophie.traits["last_name"], json!("Müller"));
    assert_eq!(sophie.traits["email"], json!("sophie.mueller@uni-example.de"));
    assert_eq!(sophie.traits["phone"], json!("+493098765432"));
    assert_eq!(sophie.traits["enrollment_status"], json!("inquiry"));
    assert!(!sophie.traits.values().any(|v| v.as_str().is_some_and(|s| s.ends_with('\r'))), "no CR left in values");
    let jonas = &out.events[1];
    assert_eq!(jonas.traits["mobile_phone"], json!("+491601234567"));
    assert_eq!(jonas.properties["consent_change"], json!({"channel": "email", "status": "opted_out"}));
    let emma = &out.events[2];
    assert_eq!(emma.raw.index, 3);
    assert_eq!(emma.traits["email_raw"], json!("emma;wagner@example.de"), "a quoted delimiter stays in its cell");
}

/// The same record version sent again is one event; exported again with more columns, it is a
/// new one (its new fields must reach the profile), and column order does not matter.
#[test]
fn csv_event_ids_follow_record_version_and_columns() {
    let opts = NormalizeOptions::default();
    let id = |header: Vec<&str>, row: Vec<&str>| {
        let (header, row) = (csv::StringRecord::from(header), csv::StringRecord::from(row));
        normalize_csv_record(&header, &row, 0, received(), &opts).unwrap().event_id
    };
    let lm = "2026-11-02T10:00:00.000+0000";
    let first = id(vec!["Id", "Email", "LastModifiedDate"], vec!["003A", "a@b.de", lm]);
    assert_eq!(first, id(vec!["Id", "Email", "LastModifiedDate"], vec!["003A", "a@b.de", lm]));
    assert_eq!(first, id(vec!["LastModifiedDate", "Id", "Email"], vec![lm, "003A", "a@b.de"]));
    let wider = id(vec!["Id", "Email", "Campus__c", "LastModifiedDate"], vec!["003A", "a@b.de", "Berlin", lm]);
    assert_ne!(first, wider);
    let later = id(vec!["Id", "Email", "LastModifiedDate"], vec!["003A", "a@b.de", "2026-11-03T10:00:00.000+0000"]);
    assert_ne!(first, later);
}

#[test]
fn csv_other_bulk_api_delimiters() {
    for d in ['\t', '|', '^', '`'] {
        let body = format!("Id{d}FirstName{d}Email\n003X{d}Anna{d}anna@example.de\n");
        let out = csv(body.as_bytes()).unwrap();
        assert_eq!(out.events.len(), 1, "{d:?}");
        assert_eq!(out.events[0].traits["first_name"], json!("Anna"), "{d:?}");
    }
    // a one-column export and a byte-order mark
    let out = csv("\u{feff}Id\n003A\n003B\n".as_bytes()).unwrap();
    assert_eq!(out.events.len(), 2);
}

#[test]
fn csv_without_an_id_column_or_header_is_an_error() {
    assert!(matches!(csv(b"FirstName,LastName\nMax,Mustermann\n"), Err(NormalizeError::SalesforceCsv(_))));
    assert!(matches!(csv(b""), Err(NormalizeError::SalesforceCsv(_))));
    assert!(matches!(csv(b"\r\n"), Err(NormalizeError::SalesforceCsv(_))));
    assert!(matches!(csv(&[0xff, 0xfe, 0x00]), Err(NormalizeError::Malformed { .. })));
    // header only: nothing to do, nothing wrong
    assert_eq!(csv(b"Id,Email\r\n").unwrap(), Normalized::default());
}

#[test]
fn csv_chunk_over_the_limit_is_too_large() {
    let opts = NormalizeOptions { max_csv_bytes: 10, ..Default::default() };
    let p = RawPayload {
        source: Source::Crm,
        format: PayloadFormat::SalesforceCsv,
        body: b"Id,Email\n003A,a@b.de\n".to_vec().into(),
        content_type: "text/csv".into(),
        received_at: received(),
    };
    assert!(matches!(normalize(&p, &opts), Err(NormalizeError::TooLarge { limit: 10, .. })));
}

#[test]
fn csv_record_function_for_streaming_importers() {
    let opts = NormalizeOptions::default();
    let header = csv::StringRecord::from(vec!["Id", "FirstName", "LastName", "Email", "HasOptedOutOfEmail"]);
    let row = csv::StringRecord::from(vec!["003Dp00000042AAA", "Lena", "Schmidt42", "LENA@uni-example.de", "true"]);
    let e = normalize_csv_record(&header, &row, 41, received(), &opts).unwrap();
    assert_eq!(e.raw.index, 41);
    assert_eq!(e.source, Source::Crm);
    assert_eq!(e.traits["email"], json!("lena@uni-example.de"));
    assert_eq!(e.traits["has_opted_out_of_email"], json!(true));
    assert_eq!(e.properties["consent_change"], json!({"channel": "email", "status": "opted_out"}));
    let short = csv::StringRecord::from(vec!["003X"]);
    let r = normalize_csv_record(&header, &short, 7, received(), &opts).unwrap_err();
    assert_eq!(r.index, Some(7));
    let empty_id = csv::StringRecord::from(vec!["  ", "A", "B", "a@b.de", "false"]);
    assert_eq!(normalize_csv_record(&header, &empty_id, 8, received(), &opts).unwrap_err().index, Some(8));
    let no_id = csv::StringRecord::from(vec!["Name"]);
    assert!(normalize_csv_record(&no_id, &csv::StringRecord::from(vec!["x"]), 0, received(), &opts).is_err());
}

#[test]
fn configured_field_map_is_used() {
    let mut opts = NormalizeOptions::default();
    opts.salesforce_fields.insert("Campus__c".into(), "campus".into());
    let header = csv::StringRecord::from(vec!["Id", "Campus__c", "Unmapped__c"]);
    let row = csv::StringRecord::from(vec!["003A", "Berlin", "x"]);
    let e = normalize_csv_record(&header, &row, 0, received(), &opts).unwrap();
    assert_eq!(e.traits["campus"], json!("Berlin"));
    assert_eq!(e.traits["Unmapped__c"], json!("x"));
}
