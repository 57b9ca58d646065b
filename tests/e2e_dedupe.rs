//! `cohort identity dedupe` on a CSV file, through the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

/// The first two columns of every data row of a CSV the binary wrote.
fn first_two_columns(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_string(), f[1].to_string())
        })
        .collect()
}

#[test]
fn a_crm_export_is_clustered_by_person() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("people.csv");
    let output = dir.path().join("clusters.csv");
    std::fs::write(
        &input,
        "Id;Vorname;Nachname;Geburtsdatum;PLZ;Ort;Mail\n\
         1;Lena;Müller;03.04.2001;20146;Hamburg;lena.mueller@gmail.com\n\
         2;LENA;Mueller;2001-04-03;20146;Hamburg;\n\
         3;Müller;Lena;3 April 2001;;;\n\
         4;Lena;Müller;22.07.1987;80331;München;\n\
         5;Jonas;Weber;;;;jonas.weber+uni@gmail.com\n\
         6;J.;Weber;;;;jonasweber@googlemail.com\n\
         7;Anna;Schmidt;10.01.2000;10115;Berlin;\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(["identity", "dedupe", "--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()])
        .args([
            "--map",
            "id=Id,first_name=Vorname,last_name=Nachname,date_of_birth=Geburtsdatum,postcode=PLZ,city=Ort,email=Mail",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["records"], 7);
    let clusters: HashMap<String, String> = first_two_columns(&output).into_iter().collect();
    assert_eq!(clusters["1"], "1");
    assert_eq!(clusters["2"], "1", "umlaut spelling, same birthday and place");
    assert_eq!(clusters["3"], "1", "swapped names, written-out birthday");
    assert_eq!(clusters["4"], "4", "same name, another birthday and city: another person");
    assert_eq!(clusters["5"], "5");
    assert_eq!(clusters["6"], "5", "one Gmail mailbox");
    assert_eq!(clusters["7"], "7");
    assert_eq!(summary["clusters"], 4);

    let bad = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(["identity", "dedupe", "--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()])
        .args(["--map", "first_name=Vorname"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("id=COL"), "{}", String::from_utf8_lossy(&bad.stderr));
}

#[test]
fn two_files_are_linked_pair_by_pair() {
    let dir = tempfile::tempdir().unwrap();
    let (left, right, out) = (dir.path().join("crm.csv"), dir.path().join("lms.csv"), dir.path().join("pairs.csv"));
    std::fs::write(&left, "id,first,last,dob,email\nc1,Lena,Müller,03.04.2001,\nc2,Jonas,Weber,,jonas.weber@gmail.com\nc3,Anna,Schmidt,10.01.2000,\n").unwrap();
    std::fs::write(&right, "id,first,last,dob,email\nl7,LENA,Mueller,2001-04-03,\nl8,J,Weber,,jonasweber+lms@gmail.com\nl9,Anna,Schmidt,22.07.1987,\n").unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(["identity", "link", "--left", left.to_str().unwrap(), "--right", right.to_str().unwrap()])
        .args([
            "--output",
            out.to_str().unwrap(),
            "--map",
            "id=id,first_name=first,last_name=last,date_of_birth=dob,email=email",
        ])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let pairs = first_two_columns(&out);
    assert_eq!(pairs, vec![("c1".to_string(), "l7".to_string()), ("c2".to_string(), "l8".to_string())]);
}
