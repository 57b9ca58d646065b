//! Given names: which spellings are distinct names (Christina and Christian are two people,
//! not a typo) and which are one name (Max is Maximilian, Kasia is Katarzyna). Compared in
//! folded form, so accents and umlaut spellings do not matter.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use super::normalize_name;

/// Common given names of European students (a name in this list is never a typo of another).
const GIVEN_NAMES: &str = "
aaron abel adam adela adrian adriana agata agnes agnieszka alba albert alberto alejandra alejandro
aleksander aleksandra alessandra alessandro alessia alex alexander alexandra alexis alfred alice alicia
alina alma alvaro amalia amelia amelie ana anastasia andrea andreas andrei andres andrzej angela angelika
angelo anja anna anne annika anton antonia antonio arthur astrid aurora barbara bartosz beata beatrice
beatriz ben benedikt benjamin bernard bertrand bianca bjorn borja bruno camila camille carina carl carla
carlo carlos carmen carolina caroline catalina cecilia celine charlotte chiara chloe christian christina
christine christoph christopher claire clara claudia clement colin constance cristian cristina damian
daniel daniela dariusz david davide denis diana diego dimitri dominik dorota edith edoardo elena eleonora
elia elias elif elisa elisabeth elisabetta eliza elke ella elodie emil emilia emilie emily emma enrique
enzo eric erik ernst esther eva ewa fabian fabio federica federico felix fernando filip filippo finn
florian francesca francesco francisco francois franziska frederik friedrich fynn gabriel gabriela
gabriele gabrielle georg george gerhard giacomo gianluca giorgia giorgio giovanna giovanni giulia giulio
giuseppe grace greta gregor guillaume gustav hanna hannah hannes hans harald hector heinrich helena helene
helga henri henrik henry herbert hugo ida ignacio ilse ines inga ingrid irene iris isabel isabella
isabelle ivan iwona jacob jacqueline jakob jakub jan jana janina jannik jasmin javier jean jeanne jens
jerome jesus joachim joanna joao joaquin jochen johann johanna johannes jonas jonathan jordi jorg jorge
jose josef josefine joseph juan judith julia julian juliane julien julius justyna jurgen kacper kamil
karin karl karolina kasper katarzyna katharina kathrin katja kevin kilian kim klara klaus konrad
konstantin krzysztof kurt lara laura laurent lea leah leandro lena lennart leo leon leonie leopold lia
lina linda lisa lorenz lorenzo louis louise luca lucas lucia luciano lucie ludwig luis luisa lukas
lukasz maciej magdalena maja malgorzata manon manuel manuela marc marcel marcin marco marcus margarete
margot maria mariana marie marina mario marion marius mark marko marta martha martin martina mateo
mateusz mathias matheo mathilde matteo matthias mattia max maxime maximilian melanie mia michael michal
michele miguel mikolaj milan milena mirko monika moritz nadine natalia nathalie nicola nicolas nicole
niklas nikola nikolaus nils nina noah noel noemi noemie nora nuria olaf olga oliver olivia oscar oskar
otto pablo paola patricia patrick paul paula paulina pauline pawel pedro peter petra philipp philippe
pia piero pierre piotr rafael rafal raffaele ralf ramon raphael raul rebecca renate rene ricardo riccardo
richard rita robert roberta roberto rodrigo roman rosa ruben rudolf ruth sabine sabrina samuel sandra
sara sarah sascha sebastian sergio silke silvia simon simona simone sofia sonja sophia sophie stefan
stefania stefanie stella stephan stephanie susanne svenja sylvia szymon tamara tanja teresa theo theresa
thomas tim timo tobias tom tomas tomasz tommaso ulrich ursula valentin valentina valeria vanessa vera
veronika victor victoria viktor viktoria vincent vincenzo wiktoria wojciech wolfgang xavier yannick
yvonne zofia zoe zuzanna
";

/// Spellings of one name: the name first, then its short and pet forms.
const NICKNAMES: &[&[&str]] = &[
    &["maximilian", "max", "maxi"],
    &["alexander", "alex", "sascha", "xander"],
    &["alexandra", "alex", "sasha", "sandra"],
    &["aleksander", "olek", "alek"],
    &["alessandro", "sandro", "ale"],
    &["katharina", "kathi", "katja", "kati", "kathrin"],
    &["katarzyna", "kasia", "kaska"],
    &["johannes", "hannes", "johann", "hans", "jo"],
    &["johanna", "hanna", "jo"],
    &["elisabeth", "lisa", "sissi", "elise", "liesl", "betty"],
    &["elisabetta", "betta", "elisa"],
    &["magdalena", "lena", "magda", "leni"],
    &["franziska", "franzi"],
    &["friedrich", "fritz"],
    &["christina", "tina", "chris"],
    &["christian", "chris"],
    &["matthias", "matze", "mathias"],
    &["benjamin", "ben", "benni"],
    &["daniel", "dani"],
    &["susanne", "susi", "sanne"],
    &["theresa", "resi", "teresa"],
    &["stefanie", "steffi", "stephanie"],
    &["michael", "michi", "mike", "michal"],
    &["nikolaus", "niko", "klaus"],
    &["margarete", "grete", "gretel", "margot"],
    &["barbara", "babsi", "basia"],
    &["sebastian", "basti"],
    &["josef", "sepp", "joseph", "jose"],
    &["giuseppe", "peppe", "beppe", "pino"],
    &["francesco", "cesco", "franco"],
    &["giovanni", "gianni", "nanni"],
    &["francisco", "paco", "pancho", "curro"],
    &["jose", "pepe"],
    &["manuel", "manu", "manolo"],
    &["malgorzata", "gosia"],
    &["wojciech", "wojtek"],
    &["tommaso", "tommy", "tom"],
    &["thomas", "tom", "tommy"],
    &["tomasz", "tomek"],
    &["lukasz", "lukas"],
    &["jakub", "kuba", "jakob"],
    &["piotr", "piotrek"],
    &["pawel", "pawelek"],
    &["agnieszka", "aga"],
    &["zuzanna", "zuzia"],
    &["wiktoria", "wika", "viktoria"],
    &["antonio", "toni", "antonino"],
    &["anton", "toni"],
    &["antonia", "toni"],
    &["andreas", "andi"],
    &["andrea", "andi"],
    &["wolfgang", "wolf"],
    &["nicolas", "nico"],
    &["nikola", "niko"],
    &["isabel", "isa", "isabella", "isabelle"],
    &["gabriele", "gabi", "gabriela", "gabrielle"],
    &["valentina", "vale"],
    &["federico", "fede"],
    &["federica", "fede"],
    &["roberto", "berto", "rob"],
    &["robert", "rob", "bob"],
    &["william", "will", "bill"],
    &["jonathan", "jonny", "jon"],
    &["samuel", "sam", "sami"],
    &["leonhard", "leo"],
    &["leopold", "leo", "poldi"],
    &["theodor", "theo"],
    &["charlotte", "lotte", "charly"],
    &["caroline", "caro", "carolina"],
    &["annika", "anni"],
    &["anna", "anni", "anja"],
];

struct Names {
    known: HashSet<String>,
    /// Folded name → the groups (indices into `NICKNAMES`) it belongs to.
    groups: HashMap<String, Vec<usize>>,
}

static NAMES: LazyLock<Names> = LazyLock::new(|| {
    let fold = |n: &str| normalize_name(n).unwrap_or_default();
    let mut known: HashSet<String> = GIVEN_NAMES.split_whitespace().map(fold).collect();
    let mut groups: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, group) in NICKNAMES.iter().enumerate() {
        for name in group.iter() {
            let folded = fold(name);
            known.insert(folded.clone());
            groups.entry(folded).or_default().push(i);
        }
    }
    Names { known, groups }
});

/// How two folded given names relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GivenNames {
    Same,
    /// One is a short or pet form of the other (Max, Maximilian).
    Nickname,
    /// Two different names (Christina, Christian): not a spelling mistake.
    Different,
    /// At least one is not a known name: it may be a typo of the other.
    Unknown,
}

/// Compares two folded given names (as [`normalize_name`] returns them).
pub fn compare_given_names(a: &str, b: &str) -> GivenNames {
    if a == b {
        return GivenNames::Same;
    }
    let names = &*NAMES;
    if let (Some(ga), Some(gb)) = (names.groups.get(a), names.groups.get(b)) {
        if ga.iter().any(|g| gb.contains(g)) {
            return GivenNames::Nickname;
        }
    }
    if names.known.contains(a) && names.known.contains(b) {
        GivenNames::Different
    } else {
        GivenNames::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmp(a: &str, b: &str) -> GivenNames {
        let f = |s: &str| normalize_name(s).unwrap_or_default();
        compare_given_names(&f(a), &f(b))
    }

    #[test]
    fn distinct_names_nicknames_and_typos_are_told_apart() {
        assert_eq!(cmp("Christina", "Christian"), GivenNames::Different);
        assert_eq!(cmp("María", "Martina"), GivenNames::Different);
        assert_eq!(cmp("Max", "Maximilian"), GivenNames::Nickname);
        assert_eq!(cmp("Kasia", "Katarzyna"), GivenNames::Nickname);
        assert_eq!(cmp("Małgorzata", "Gosia"), GivenNames::Nickname);
        assert_eq!(cmp("Michael", "Michał"), GivenNames::Same, "folded alike");
        assert_eq!(cmp("Jürgen", "Juergen"), GivenNames::Same);
        assert_eq!(cmp("Katharina", "Katharnia"), GivenNames::Unknown, "a typo is not a known name");
    }
}
