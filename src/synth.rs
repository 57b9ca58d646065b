//! Synthetic EU student records with known truth, for the identity accuracy benchmark.
//!
//! Each person is written once and some of them again, as another system would hold them:
//! typos, swapped first and last names, nicknames, umlaut spellings, missing fields, a changed
//! email, a new address, a mistyped birthday. Siblings share a surname, an address and the
//! family phone, which is exactly what must never merge them.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;

/// The CSV columns: every field `cohort identity dedupe` can map, in its order.
pub use crate::dedupe::FIELDS as COLUMNS;

/// The `--map` that reads [`COLUMNS`] one to one.
pub fn column_map() -> String {
    COLUMNS.iter().map(|c| format!("{c}={c}")).collect::<Vec<_>>().join(",")
}

struct Country {
    code: &'static str,
    dial: &'static str,
    first: &'static [&'static str],
    last: &'static [&'static str],
    /// (city, region, postcode prefix)
    cities: &'static [(&'static str, &'static str, &'static str)],
    streets: &'static [&'static str],
    mail: &'static [&'static str],
}

const COUNTRIES: &[Country] = &[
    Country {
        code: "DE",
        dial: "+49 15",
        first: &[
            "Maximilian",
            "Alexander",
            "Katharina",
            "Johannes",
            "Elisabeth",
            "Magdalena",
            "Lena",
            "Jonas",
            "Lukas",
            "Sophie",
            "Marie",
            "Felix",
            "Leonie",
            "Paul",
            "Anna",
            "Laura",
            "Tim",
            "Jan",
            "Franziska",
            "Friedrich",
            "Jürgen",
            "Jörg",
            "Björn",
            "Sören",
            "Hannah",
            "Emilia",
            "Niklas",
            "Tobias",
            "Christina",
            "Matthias",
            "Benjamin",
            "Daniel",
            "Susanne",
            "Theresa",
            "Stefanie",
            "Wolfgang",
            "Michael",
            "Andreas",
            "Nikolaus",
            "Margarete",
            "Barbara",
            "Christian",
            "Sebastian",
            "Julia",
            "Clara",
            "Greta",
            "Mats",
            "Ole",
            "Fynn",
        ],
        last: &[
            "Müller",
            "Schmidt",
            "Schneider",
            "Fischer",
            "Weber",
            "Meyer",
            "Wagner",
            "Becker",
            "Schulz",
            "Hoffmann",
            "Schäfer",
            "Koch",
            "Bauer",
            "Richter",
            "Klein",
            "Wolf",
            "Schröder",
            "Neumann",
            "Schwarz",
            "Zimmermann",
            "Braun",
            "Krüger",
            "Hofmann",
            "Hartmann",
            "Lange",
            "Schmitt",
            "Werner",
            "Krause",
            "Meier",
            "Lehmann",
            "Köhler",
            "Größer",
            "Weiß",
            "Jäger",
            "Vogel",
            "Günther",
            "Böhm",
            "Fuchs",
            "Möller",
            "Kühn",
            "Heinrich",
            "Brandt",
            "Haas",
            "Schubert",
            "Graf",
            "Dietrich",
            "Ziegler",
            "Kuhn",
            "Pohl",
            "Engel",
            "Horn",
            "Sommer",
        ],
        cities: &[
            ("Berlin", "Berlin", "10"),
            ("Hamburg", "Hamburg", "20"),
            ("München", "Bayern", "80"),
            ("Köln", "Nordrhein-Westfalen", "50"),
            ("Frankfurt am Main", "Hessen", "60"),
            ("Stuttgart", "Baden-Württemberg", "70"),
            ("Leipzig", "Sachsen", "04"),
            ("Dresden", "Sachsen", "01"),
            ("Freiburg", "Baden-Württemberg", "79"),
            ("Göttingen", "Niedersachsen", "37"),
            ("Münster", "Nordrhein-Westfalen", "48"),
            ("Heidelberg", "Baden-Württemberg", "69"),
        ],
        streets: &[
            "Hauptstraße",
            "Schulstraße",
            "Gartenstraße",
            "Bahnhofstraße",
            "Lindenallee",
            "Goethestraße",
            "Schillerplatz",
            "Am Mühlbach",
            "Grüner Weg",
            "Birkenweg",
            "Königsallee",
            "Universitätsstraße",
        ],
        mail: &["gmail.com", "web.de", "gmx.de", "t-online.de", "posteo.de", "uni-hamburg.de"],
    },
    Country {
        code: "AT",
        dial: "+43 66",
        first: &[
            "Florian",
            "Elias",
            "Valentina",
            "Johanna",
            "Sebastian",
            "Theresa",
            "Lorenz",
            "Magdalena",
            "Anna",
            "Jakob",
            "Katharina",
            "Hannes",
            "Josef",
            "Franziska",
            "Leopold",
            "Maximilian",
            "Viktoria",
        ],
        last: &[
            "Gruber",
            "Huber",
            "Bauer",
            "Wagner",
            "Pichler",
            "Steiner",
            "Moser",
            "Mayer",
            "Hofer",
            "Leitner",
            "Berger",
            "Fuchs",
            "Eder",
            "Fischer",
            "Schmid",
            "Winkler",
            "Weber",
            "Schwarz",
            "Maier",
            "Schneider",
            "Wimmer",
            "Egger",
            "Brunner",
            "Lang",
            "Baumgartner",
            "Auer",
            "Binder",
            "Lechner",
            "Wolf",
            "Wallner",
        ],
        cities: &[
            ("Wien", "Wien", "1"),
            ("Graz", "Steiermark", "80"),
            ("Linz", "Oberösterreich", "40"),
            ("Salzburg", "Salzburg", "50"),
            ("Innsbruck", "Tirol", "60"),
        ],
        streets: &["Mariahilfer Straße", "Herrengasse", "Landstraße", "Kirchengasse", "Schönbrunner Straße"],
        mail: &["gmx.at", "gmail.com", "chello.at", "univie.ac.at"],
    },
    Country {
        code: "FR",
        dial: "+33 6",
        first: &[
            "Léa",
            "Chloé",
            "Manon",
            "Camille",
            "Théo",
            "Hugo",
            "Louis",
            "Gabriel",
            "Jules",
            "Inès",
            "Zoé",
            "Mathéo",
            "Clément",
            "Élodie",
            "Hélène",
            "François",
            "Amélie",
            "Noémie",
            "Benoît",
            "Jérôme",
        ],
        last: &[
            "Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand", "Leroy", "Moreau",
            "Simon", "Laurent", "Lefèvre", "Michel", "Garcia", "David", "Bertrand", "Roux", "Vincent", "Fournier",
            "Girard", "Bonnet", "Dupont", "Lambert", "Fontaine", "Rousseau", "Mercier", "Blanc", "Guérin", "Faure",
        ],
        cities: &[
            ("Paris", "Île-de-France", "75"),
            ("Lyon", "Auvergne-Rhône-Alpes", "69"),
            ("Toulouse", "Occitanie", "31"),
            ("Bordeaux", "Nouvelle-Aquitaine", "33"),
            ("Lille", "Hauts-de-France", "59"),
            ("Strasbourg", "Grand Est", "67"),
        ],
        streets: &["Rue de la Paix", "Avenue Victor Hugo", "Rue du Moulin", "Boulevard Voltaire", "Rue des Écoles"],
        mail: &["orange.fr", "free.fr", "gmail.com", "laposte.net", "sorbonne-universite.fr"],
    },
    Country {
        code: "IT",
        dial: "+39 3",
        first: &[
            "Giuseppe",
            "Francesco",
            "Alessandro",
            "Giovanni",
            "Roberto",
            "Lorenzo",
            "Matteo",
            "Giulia",
            "Sofia",
            "Aurora",
            "Chiara",
            "Martina",
            "Federica",
            "Niccolò",
            "Beatrice",
            "Elisabetta",
            "Tommaso",
        ],
        last: &[
            "Rossi", "Russo", "Ferrari", "Esposito", "Bianchi", "Romano", "Colombo", "Ricci", "Marino", "Greco",
            "Bruno", "Gallo", "Conti", "De Luca", "Mancini", "Costa", "Giordano", "Rizzo", "Lombardi", "Moretti",
            "Barbieri", "Fontana", "Santoro", "Mariani", "Rinaldi", "Caruso", "Ferrara", "Galli", "Martini", "Leone",
        ],
        cities: &[
            ("Roma", "Lazio", "00"),
            ("Milano", "Lombardia", "20"),
            ("Torino", "Piemonte", "10"),
            ("Bologna", "Emilia-Romagna", "40"),
            ("Firenze", "Toscana", "50"),
            ("Napoli", "Campania", "80"),
        ],
        streets: &["Via Roma", "Via Garibaldi", "Corso Vittorio Emanuele", "Via Dante", "Piazza del Duomo"],
        mail: &["libero.it", "gmail.com", "virgilio.it", "unibo.it", "tiscali.it"],
    },
    Country {
        code: "ES",
        dial: "+34 6",
        first: &[
            "José",
            "Francisco",
            "Manuel",
            "Lucía",
            "Martina",
            "Pablo",
            "Álvaro",
            "Sofía",
            "Javier",
            "María",
            "Carmen",
            "Sergio",
            "Andrés",
            "Raúl",
            "Núria",
            "Jordi",
            "Ángela",
            "Íñigo",
        ],
        last: &[
            "García",
            "Rodríguez",
            "González",
            "Fernández",
            "López",
            "Martínez",
            "Sánchez",
            "Pérez",
            "Gómez",
            "Martín",
            "Jiménez",
            "Ruiz",
            "Hernández",
            "Díaz",
            "Moreno",
            "Muñoz",
            "Álvarez",
            "Romero",
            "Alonso",
            "Gutiérrez",
            "Navarro",
            "Torres",
            "Domínguez",
            "Vázquez",
            "Ramos",
            "Gil",
            "Ramírez",
            "Serrano",
            "Blanco",
        ],
        cities: &[
            ("Madrid", "Madrid", "28"),
            ("Barcelona", "Cataluña", "08"),
            ("Valencia", "Valencia", "46"),
            ("Sevilla", "Andalucía", "41"),
            ("Salamanca", "Castilla y León", "37"),
        ],
        streets: &["Calle Mayor", "Gran Vía", "Calle de Alcalá", "Avenida de la Constitución", "Calle Real"],
        mail: &["gmail.com", "hotmail.es", "yahoo.es", "telefonica.net", "ucm.es"],
    },
    Country {
        code: "PL",
        dial: "+48 5",
        first: &[
            "Małgorzata",
            "Katarzyna",
            "Wojciech",
            "Aleksander",
            "Agnieszka",
            "Łukasz",
            "Paweł",
            "Zofia",
            "Michał",
            "Krzysztof",
            "Magdalena",
            "Tomasz",
            "Jakub",
            "Piotr",
            "Joanna",
            "Bartosz",
        ],
        last: &[
            "Nowak",
            "Kowalski",
            "Wiśniewski",
            "Wójcik",
            "Kowalczyk",
            "Kamiński",
            "Lewandowski",
            "Zieliński",
            "Szymański",
            "Woźniak",
            "Dąbrowski",
            "Kozłowski",
            "Jankowski",
            "Mazur",
            "Kwiatkowski",
            "Krawczyk",
            "Piotrowski",
            "Grabowski",
            "Nowakowski",
            "Pawłowski",
            "Michalski",
            "Król",
            "Wieczorek",
            "Jabłoński",
        ],
        cities: &[
            ("Warszawa", "Mazowieckie", "00"),
            ("Kraków", "Małopolskie", "30"),
            ("Wrocław", "Dolnośląskie", "50"),
            ("Poznań", "Wielkopolskie", "60"),
            ("Gdańsk", "Pomorskie", "80"),
        ],
        streets: &["ulica Długa", "ulica Marszałkowska", "ulica Floriańska", "aleja Jana Pawła II", "ulica Piękna"],
        mail: &["wp.pl", "onet.pl", "gmail.com", "interia.pl", "uw.edu.pl"],
    },
];

/// Nicknames a second system may hold instead of the given name.
const NICKNAMES: &[(&str, &[&str])] = &[
    ("Maximilian", &["Max", "Maxi"]),
    ("Alexander", &["Alex", "Sascha"]),
    ("Katharina", &["Kathi", "Katja"]),
    ("Johannes", &["Hannes", "Johann"]),
    ("Elisabeth", &["Lisa", "Sissi"]),
    ("Magdalena", &["Lena", "Magda"]),
    ("Franziska", &["Franzi"]),
    ("Friedrich", &["Fritz"]),
    ("Christina", &["Tina"]),
    ("Matthias", &["Matze"]),
    ("Benjamin", &["Ben", "Benni"]),
    ("Daniel", &["Dani"]),
    ("Susanne", &["Susi"]),
    ("Theresa", &["Resi"]),
    ("Stefanie", &["Steffi"]),
    ("Michael", &["Michi"]),
    ("Nikolaus", &["Niko"]),
    ("Margarete", &["Grete"]),
    ("Barbara", &["Babsi"]),
    ("Sebastian", &["Basti"]),
    ("Josef", &["Sepp"]),
    ("Giuseppe", &["Peppe", "Beppe"]),
    ("Francesco", &["Cesco"]),
    ("Alessandro", &["Sandro"]),
    ("Giovanni", &["Gianni"]),
    ("Francisco", &["Paco"]),
    ("José", &["Pepe"]),
    ("Manuel", &["Manu"]),
    ("Katarzyna", &["Kasia"]),
    ("Małgorzata", &["Gosia"]),
    ("Wojciech", &["Wojtek"]),
    ("Aleksander", &["Olek"]),
    ("Tommaso", &["Tommy"]),
    ("Elisabetta", &["Betta"]),
];

/// One record as written to the CSV file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SynthRecord {
    pub id: String,
    pub first_name: String,
    pub last_name: String,
    pub email: String,
    pub phone: String,
    pub date_of_birth: String,
    pub street: String,
    pub house_number: String,
    pub postcode: String,
    pub city: String,
    pub region: String,
    pub national_id: String,
}

impl SynthRecord {
    /// In the order of [`COLUMNS`].
    fn fields(&self) -> [&str; 12] {
        [
            &self.id,
            &self.first_name,
            &self.last_name,
            &self.email,
            &self.phone,
            &self.date_of_birth,
            &self.street,
            &self.house_number,
            &self.postcode,
            &self.city,
            &self.region,
            &self.national_id,
        ]
    }

    /// Whether name, date of birth and address are all present (the F1 target subset).
    pub fn is_complete(&self) -> bool {
        [&self.first_name, &self.last_name, &self.date_of_birth, &self.street, &self.postcode, &self.city]
            .iter()
            .all(|f| !f.is_empty())
    }
}

/// Records with the person each one is (`truth[i]` is the entity of `records[i]`) and the
/// families that share a phone.
#[derive(Debug, Clone, Default)]
pub struct Synth {
    pub records: Vec<SynthRecord>,
    pub truth: Vec<u32>,
}

impl Synth {
    pub fn write_csv(&self, path: &Path) -> anyhow::Result<()> {
        let mut w = csv::Writer::from_path(path)?;
        w.write_record(COLUMNS)?;
        for r in &self.records {
            w.write_record(r.fields())?;
        }
        w.flush()?;
        Ok(())
    }

    /// Writes the records at `indices` only (for a link benchmark's two files).
    pub fn write_subset(&self, path: &Path, indices: &[usize]) -> anyhow::Result<()> {
        let mut w = csv::Writer::from_path(path)?;
        w.write_record(COLUMNS)?;
        for &i in indices {
            w.write_record(self.records[i].fields())?;
        }
        w.flush()?;
        Ok(())
    }
}

struct Person {
    country: &'static Country,
    first: String,
    last: String,
    dob: chrono::NaiveDate,
    street: String,
    house: u32,
    city: usize,
    postcode: String,
    email: String,
    phone: String,
    national_id: Option<String>,
}

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.gen_range(0..items.len())]
}

fn random_dob(rng: &mut StdRng) -> chrono::NaiveDate {
    let start = chrono::NaiveDate::from_ymd_opt(1988, 1, 1).unwrap_or_default();
    start + chrono::Duration::days(rng.gen_range(0..(20 * 365)))
}

fn ascii_local(s: &str) -> String {
    let folded = cohort_actors::normalize::normalize_name(s).unwrap_or_default();
    folded.chars().filter(|c| c.is_ascii_alphanumeric()).collect()
}

fn new_address(rng: &mut StdRng, country: &'static Country) -> (String, u32, usize, String) {
    let city = rng.gen_range(0..country.cities.len());
    let prefix = country.cities[city].2;
    let width = if country.code == "AT" { 4 } else { 5 };
    let rest: String = (prefix.len()..width).map(|_| char::from(b'0' + rng.gen_range(0..10u8))).collect();
    (pick(rng, country.streets).to_string(), rng.gen_range(1..180), city, format!("{prefix}{rest}"))
}

fn new_email(rng: &mut StdRng, country: &Country, first: &str, last: &str) -> String {
    let (f, l) = (ascii_local(first), ascii_local(last));
    let n: u32 = rng.gen_range(1..999);
    let local = match rng.gen_range(0..4) {
        0 => format!("{f}.{l}"),
        1 => format!("{f}{l}{n}"),
        2 => format!("{}.{l}{n}", f.chars().next().unwrap_or('x')),
        _ => format!("{f}_{l}_{n}"),
    };
    format!("{local}@{}", pick(rng, country.mail))
}

fn new_phone(rng: &mut StdRng, country: &Country) -> String {
    // Mobile numbers of the country's length, so they parse as valid.
    let n = match country.code {
        "DE" | "AT" | "IT" => 8,
        _ => 7,
    };
    let digits: String = (0..n).map(|_| char::from(b'0' + rng.gen_range(0..10u8))).collect();
    format!("{}{}{digits}", country.dial, rng.gen_range(1..10))
}

fn person(rng: &mut StdRng, family: &[Person], emails: &mut std::collections::HashSet<String>) -> Person {
    let mut p = person_draft(rng, family.first());
    if let Some(f) = family.first() {
        // Siblings have names and birthdays of their own.
        while family.iter().any(|s| s.first == p.first || (s.dob - p.dob).num_days().abs() < 300) {
            p.first = pick(rng, f.country.first).to_string();
            p.dob = random_dob(rng);
        }
        p.email = new_email(rng, p.country, &p.first, &p.last);
    }
    // An address belongs to one person.
    while !emails.insert(p.email.clone()) {
        p.email = new_email(rng, p.country, &p.first, &p.last);
    }
    p
}

fn person_draft(rng: &mut StdRng, family: Option<&Person>) -> Person {
    let country = match family {
        Some(f) => f.country,
        None => pick(rng, COUNTRIES),
    };
    let first = pick(rng, country.first).to_string();
    match family {
        Some(f) => {
            // A sibling: same surname, home and family phone; own name, birthday and email.
            let dob = random_dob(rng);
            Person {
                country,
                email: new_email(rng, country, &first, &f.last),
                first,
                last: f.last.clone(),
                dob,
                street: f.street.clone(),
                house: f.house,
                city: f.city,
                postcode: f.postcode.clone(),
                phone: f.phone.clone(),
                national_id: rng
                    .gen_bool(0.2)
                    .then(|| format!("{}{:09}", country.code, rng.gen_range(0..1_000_000_000u64))),
            }
        }
        None => {
            let last = pick(rng, country.last).to_string();
            let (street, house, city, postcode) = new_address(rng, country);
            Person {
                country,
                email: new_email(rng, country, &first, &last),
                phone: new_phone(rng, country),
                first,
                last,
                dob: random_dob(rng),
                street,
                house,
                city,
                postcode,
                national_id: rng
                    .gen_bool(0.2)
                    .then(|| format!("{}{:09}", country.code, rng.gen_range(0..1_000_000_000u64))),
            }
        }
    }
}

/// A keyboard slip: one character dropped, doubled, swapped with the next or replaced.
fn typo(rng: &mut StdRng, s: &str) -> String {
    let mut chars: Vec<char> = s.chars().collect();
    if chars.len() < 4 {
        return s.to_string();
    }
    let i = rng.gen_range(1..chars.len() - 1);
    match rng.gen_range(0..4) {
        0 => {
            chars.remove(i);
        }
        1 => chars.insert(i, chars[i]),
        2 => chars.swap(i, i + 1),
        _ => chars[i] = char::from(b'a' + rng.gen_range(0..26u8)),
    }
    chars.into_iter().collect()
}

/// Another way of writing the same letters: umlauts as digraphs or without dots, ß as ss,
/// accents dropped, or the whole name in capitals.
fn respell(rng: &mut StdRng, s: &str) -> String {
    match rng.gen_range(0..3) {
        0 => s
            .replace('ä', "ae")
            .replace('ö', "oe")
            .replace('ü', "ue")
            .replace('Ä', "Ae")
            .replace('Ö', "Oe")
            .replace('Ü', "Ue")
            .replace('ß', "ss"),
        1 => s.chars().map(deunicode_char).collect(),
        _ => s.to_uppercase(),
    }
}

fn deunicode_char(c: char) -> char {
    match c {
        'ä' | 'á' | 'à' | 'â' => 'a',
        'ö' | 'ó' | 'ò' | 'ô' => 'o',
        'ü' | 'ú' | 'ù' | 'û' => 'u',
        'é' | 'è' | 'ê' | 'ë' => 'e',
        'í' | 'ì' | 'î' | 'ï' => 'i',
        'ñ' | 'ń' => 'n',
        'ł' => 'l',
        'ś' => 's',
        'ć' | 'ç' => 'c',
        'ź' | 'ż' => 'z',
        'ą' => 'a',
        'ę' => 'e',
        'Á' | 'Ä' => 'A',
        'É' | 'È' => 'E',
        'Ö' | 'Ó' => 'O',
        'Ü' | 'Ú' => 'U',
        'Ł' => 'L',
        other => other,
    }
}

fn format_dob(rng: &mut StdRng, d: chrono::NaiveDate) -> String {
    match rng.gen_range(0..3) {
        0 => d.format("%Y-%m-%d").to_string(),
        1 => d.format("%d.%m.%Y").to_string(),
        _ => d.format("%d/%m/%Y").to_string(),
    }
}

fn format_phone(rng: &mut StdRng, e164: &str) -> String {
    // National or international notation, with or without spaces.
    let compact = e164.replace(' ', "");
    if rng.gen_bool(0.5) {
        return compact;
    }
    let (dial, rest) = e164.split_once(' ').unwrap_or(("", e164));
    match dial {
        "+49" | "+43" => format!("0{}", rest.replace(' ', "")),
        _ => format!("{dial} {rest}"),
    }
}

/// What the first record of a person looks like (a clean CRM entry, mostly).
fn clean(rng: &mut StdRng, p: &Person) -> SynthRecord {
    let (city, region, _) = p.country.cities[p.city];
    SynthRecord {
        id: String::new(),
        first_name: p.first.clone(),
        last_name: p.last.clone(),
        email: p.email.clone(),
        phone: format_phone(rng, &p.phone),
        date_of_birth: format_dob(rng, p.dob),
        street: p.street.clone(),
        house_number: p.house.to_string(),
        postcode: p.postcode.clone(),
        city: city.to_string(),
        region: region.to_string(),
        national_id: p.national_id.clone().unwrap_or_default(),
    }
}

/// The same person as another system holds them.
fn corrupt(rng: &mut StdRng, p: &Person) -> SynthRecord {
    let mut r = clean(rng, p);
    if rng.gen_bool(0.08) {
        if let Some((_, nicks)) = NICKNAMES.iter().find(|(name, _)| *name == p.first) {
            r.first_name = pick(rng, nicks).to_string();
        }
    }
    if rng.gen_bool(0.12) {
        r.first_name = respell(rng, &r.first_name);
    }
    if rng.gen_bool(0.12) {
        r.last_name = respell(rng, &r.last_name);
    }
    if rng.gen_bool(0.08) {
        r.first_name = typo(rng, &r.first_name);
    }
    if rng.gen_bool(0.08) {
        r.last_name = typo(rng, &r.last_name);
    }
    if rng.gen_bool(0.03) {
        std::mem::swap(&mut r.first_name, &mut r.last_name);
    }
    if rng.gen_bool(0.25) {
        // A second address of the same person (never another person's: a random tag).
        let tag: u32 = rng.gen_range(1000..9999);
        r.email = format!("{}.{}{tag}@{}", ascii_local(&p.first), ascii_local(&p.last), pick(rng, p.country.mail));
    }
    if rng.gen_bool(0.10) {
        let (street, house, city, postcode) = new_address(rng, p.country);
        let (city_name, region, _) = p.country.cities[city];
        (r.street, r.house_number, r.postcode) = (street, house.to_string(), postcode);
        (r.city, r.region) = (city_name.to_string(), region.to_string());
    } else if rng.gen_bool(0.08) {
        r.street = typo(rng, &r.street);
    }
    if rng.gen_bool(0.05) {
        use chrono::Datelike;
        let slipped = match rng.gen_range(0..2) {
            0 => chrono::NaiveDate::from_ymd_opt(p.dob.year(), p.dob.day(), p.dob.month()),
            _ => p.dob.succ_opt(),
        };
        if let Some(d) = slipped {
            r.date_of_birth = format_dob(rng, d);
        }
    }
    if rng.gen_bool(0.10) {
        let phone = new_phone(rng, p.country);
        r.phone = format_phone(rng, &phone);
    }
    for (field, p_missing) in [(0, 0.15), (1, 0.15), (2, 0.10), (3, 0.10), (4, 0.5)] {
        if rng.gen_bool(p_missing) {
            match field {
                0 => r.email.clear(),
                1 => r.phone.clear(),
                2 => r.date_of_birth.clear(),
                3 => {
                    r.street.clear();
                    r.house_number.clear();
                    r.postcode.clear();
                    r.city.clear();
                }
                _ => r.national_id.clear(),
            }
        }
    }
    r
}

/// About `records` records of about `records / 1.55` people, seeded: the same seed gives the
/// same file. A fifth of the people are siblings sharing a family.
pub fn generate(records: usize, seed: u64) -> Synth {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out: Vec<(SynthRecord, u32)> = Vec::with_capacity(records + 4);
    let mut entity = 0u32;
    let mut emails = std::collections::HashSet::new();
    while out.len() < records {
        let first = person(&mut rng, &[], &mut emails);
        let mut family = vec![first];
        if rng.gen_bool(0.12) {
            for _ in 0..rng.gen_range(1..=2) {
                let sibling = person(&mut rng, &family, &mut emails);
                family.push(sibling);
            }
        }
        for p in &family {
            out.push((clean(&mut rng, p), entity));
            let copies = match rng.gen_range(0..100) {
                0..=54 => 0,
                55..=84 => 1,
                85..=95 => 2,
                _ => 3,
            };
            for _ in 0..copies {
                out.push((corrupt(&mut rng, p), entity));
            }
            entity += 1;
        }
    }
    out.truncate(records);
    out.shuffle(&mut rng);
    let mut synth = Synth::default();
    for (i, (mut r, e)) in out.into_iter().enumerate() {
        r.id = format!("r{i:07}");
        synth.records.push(r);
        synth.truth.push(e);
    }
    synth
}

/// Pair precision, recall and F1.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct PairScores {
    pub true_pairs: u64,
    pub predicted_pairs: u64,
    pub correct_pairs: u64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

impl PairScores {
    fn new(true_pairs: u64, predicted_pairs: u64, correct_pairs: u64) -> Self {
        let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
        let (precision, recall) = (ratio(correct_pairs, predicted_pairs), ratio(correct_pairs, true_pairs));
        let f1 = if precision + recall == 0.0 { 0.0 } else { 2.0 * precision * recall / (precision + recall) };
        Self { true_pairs, predicted_pairs, correct_pairs, precision, recall, f1 }
    }
}

fn pairs(n: u64) -> u64 {
    n * n.saturating_sub(1) / 2
}

/// How a clustering compares with the truth.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ClusterEvaluation {
    /// Over all records.
    pub all: PairScores,
    /// Over records with name, date of birth and address (pairs of two such records).
    pub complete: PairScores,
    /// Wrongly clustered pairs that share a phone number: merges a family phone caused.
    pub false_pairs_sharing_a_phone: u64,
}

/// Scores `cluster_of` (record id → cluster id, as `dedupe` writes it) against the truth.
pub fn evaluate_clusters(synth: &Synth, cluster_of: &HashMap<String, String>) -> anyhow::Result<ClusterEvaluation> {
    let score = |keep: &dyn Fn(usize) -> bool| -> anyhow::Result<PairScores> {
        let mut by_entity: HashMap<u32, u64> = HashMap::new();
        let mut by_cluster: HashMap<&str, u64> = HashMap::new();
        let mut by_both: HashMap<(&str, u32), u64> = HashMap::new();
        for (i, r) in synth.records.iter().enumerate().filter(|(i, _)| keep(*i)) {
            let cluster =
                cluster_of.get(&r.id).ok_or_else(|| anyhow::anyhow!("record {} missing from the clusters", r.id))?;
            *by_entity.entry(synth.truth[i]).or_default() += 1;
            *by_cluster.entry(cluster.as_str()).or_default() += 1;
            *by_both.entry((cluster.as_str(), synth.truth[i])).or_default() += 1;
        }
        Ok(PairScores::new(
            by_entity.values().map(|n| pairs(*n)).sum(),
            by_cluster.values().map(|n| pairs(*n)).sum(),
            by_both.values().map(|n| pairs(*n)).sum(),
        ))
    };
    let all = score(&|_| true)?;
    let complete = score(&|i| synth.records[i].is_complete())?;
    let sharing = false_pairs_sharing_a_phone(synth, cluster_of).len() as u64;
    Ok(ClusterEvaluation { all, complete, false_pairs_sharing_a_phone: sharing })
}

/// Pairs of records of different people put in one cluster while sharing a phone number.
pub fn false_pairs_sharing_a_phone(synth: &Synth, cluster_of: &HashMap<String, String>) -> Vec<(usize, usize)> {
    let digits = |p: &str| -> String {
        let d: String = p.chars().filter(char::is_ascii_digit).collect();
        d.chars().rev().take(9).collect()
    };
    let mut members: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, r) in synth.records.iter().enumerate() {
        if let Some(c) = cluster_of.get(&r.id) {
            members.entry(c.as_str()).or_default().push(i);
        }
    }
    let mut out = Vec::new();
    for m in members.values() {
        for (x, &i) in m.iter().enumerate() {
            for &j in &m[x + 1..] {
                let (a, b) = (&synth.records[i], &synth.records[j]);
                if synth.truth[i] != synth.truth[j] && !a.phone.is_empty() && digits(&a.phone) == digits(&b.phone) {
                    out.push((i, j));
                }
            }
        }
    }
    out
}

/// Scores linked pairs (left id, right id) between `left` and `right` records against the truth.
pub fn evaluate_links(synth: &Synth, left: &[usize], right: &[usize], links: &[(String, String)]) -> PairScores {
    let entity: HashMap<&str, u32> = synth.records.iter().zip(&synth.truth).map(|(r, e)| (r.id.as_str(), *e)).collect();
    let mut right_per_entity: HashMap<u32, u64> = HashMap::new();
    for &j in right {
        *right_per_entity.entry(synth.truth[j]).or_default() += 1;
    }
    let true_pairs: u64 = left.iter().map(|&i| right_per_entity.get(&synth.truth[i]).copied().unwrap_or(0)).sum();
    let correct = links
        .iter()
        .filter(|(l, r)| entity.contains_key(l.as_str()) && entity.get(l.as_str()) == entity.get(r.as_str()))
        .count();
    PairScores::new(true_pairs, links.len() as u64, correct as u64)
}

/// A link benchmark's split: each person's first record on the left (the CRM), every other
/// record on the right (the file to link).
pub fn link_split(synth: &Synth) -> (Vec<usize>, Vec<usize>) {
    let mut seen = std::collections::HashSet::new();
    let (mut left, mut right) = (Vec::new(), Vec::new());
    for (i, e) in synth.truth.iter().enumerate() {
        if seen.insert(*e) {
            left.push(i);
        } else {
            right.push(i);
        }
    }
    (left, right)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_records_and_siblings_share_a_phone_not_a_person() {
        let a = generate(2_000, 7);
        assert_eq!(a.records.len(), 2_000);
        assert_eq!(a.records, generate(2_000, 7).records);
        let entities: std::collections::HashSet<u32> = a.truth.iter().copied().collect();
        assert!(entities.len() > 1_000 && entities.len() < 1_600, "{}", entities.len());
        // Some different people share a phone number (families), which the evaluation watches.
        let mut owners: HashMap<String, std::collections::HashSet<u32>> = HashMap::new();
        for (r, e) in a.records.iter().zip(&a.truth) {
            if !r.phone.is_empty() {
                let d: String = r.phone.chars().filter(char::is_ascii_digit).collect();
                owners.entry(d.chars().rev().take(9).collect()).or_default().insert(*e);
            }
        }
        assert!(owners.values().filter(|o| o.len() > 1).count() > 20);
    }

    #[test]
    fn pair_scores_count_pairs_within_clusters() {
        let synth = Synth {
            records: (0..4).map(|i| SynthRecord { id: format!("r{i}"), ..SynthRecord::default() }).collect(),
            truth: vec![1, 1, 1, 2],
        };
        // {r0, r1} {r2, r3}: one correct pair of three true, one of two predicted.
        let clusters: HashMap<String, String> = [("r0", "a"), ("r1", "a"), ("r2", "b"), ("r3", "b")]
            .iter()
            .map(|(r, c)| (r.to_string(), c.to_string()))
            .collect();
        let e = evaluate_clusters(&synth, &clusters).unwrap();
        assert_eq!((e.all.true_pairs, e.all.predicted_pairs, e.all.correct_pairs), (3, 2, 1));
        assert!((e.all.precision - 0.5).abs() < 1e-9 && (e.all.recall - 1.0 / 3.0).abs() < 1e-9);
    }
}
