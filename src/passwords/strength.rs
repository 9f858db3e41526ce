//! The password strength policy `mqtt-uplink passwd` applies to new device passwords: a minimum
//! length, character classes for shorter passwords, no single repeated character, not a common
//! password, not containing the username.

use thiserror::Error;

/// A password refused by [`check_strength`]; the message names the rule, never the password.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WeakPassword {
    /// Fewer than [`MIN_PASSWORD_CHARS`] characters.
    #[error("password must be at least {min} characters long (it has {actual})")]
    TooShort {
        /// The minimum length.
        min: usize,
        /// The password's length in characters.
        actual: usize,
    },
    /// A short-ish password without enough character classes.
    #[error(
        "a password shorter than {long} characters must mix at least {required} of: lowercase, \
         uppercase, digits, other characters (it has {found})"
    )]
    TooFewClasses {
        /// Length from which the class rule no longer applies.
        long: usize,
        /// Classes required.
        required: usize,
        /// Classes present.
        found: usize,
    },
    /// The password contains the username.
    #[error("password must not contain the username")]
    ContainsUsername,
    /// The password is on the built-in list of common passwords.
    #[error("password is one of the most common passwords")]
    Common,
    /// The password is one character repeated.
    #[error("password must not be a single repeated character")]
    RepeatedCharacter,
}

/// Minimum password length, in characters, for [`check_strength`].
pub const MIN_PASSWORD_CHARS: usize = 12;
/// From this length on, [`check_strength`] no longer asks for several character classes.
pub const LONG_PASSWORD_CHARS: usize = 16;

/// Frequently used passwords (from public breach-frequency lists), lowercase. Most are
/// shorter than the minimum length anyway; they are listed so the check does not depend on
/// the length rule.
const COMMON_PASSWORDS: [&str; 52] = [
    "123456",
    "123456789",
    "12345678",
    "password",
    "qwerty123",
    "qwerty1",
    "111111",
    "12345",
    "secret",
    "123123",
    "1234567890",
    "1234567",
    "000000",
    "qwerty",
    "abc123",
    "password1",
    "iloveyou",
    "11111111",
    "dragon",
    "monkey",
    "123321",
    "654321",
    "666666",
    "121212",
    "letmein",
    "welcome",
    "admin",
    "administrator",
    "changeme",
    "passw0rd",
    "p@ssw0rd",
    "p@ssword",
    "football",
    "baseball",
    "sunshine",
    "princess",
    "trustno1",
    "master",
    "qwertyuiop",
    "1q2w3e4r",
    "1q2w3e4r5t6y",
    "zaq12wsx",
    "password123",
    "password1234",
    "123456789012",
    "qwerty123456",
    "qwertyuiop123",
    "iloveyou1234",
    "1qaz2wsx3edc",
    "welcome12345",
    "changeme1234",
    "passwordpassword",
];

/// Checks `password` (for account `user`) against mqtt-uplink's password policy.
///
/// The rules, checked in this order:
/// 1. at least 12 characters (Unicode scalar values);
/// 2. not a single character repeated (`aaaaaaaaaaaa`);
/// 3. not one of ~50 built-in most common passwords (compared case-insensitively);
/// 4. when the username is at least 3 characters long, the password must not contain it
///    (case-insensitive);
/// 5. a password shorter than 16 characters must contain at least 3 of the 4 classes:
///    lowercase letters, uppercase letters, digits, anything else.
pub fn check_strength(password: &str, user: &str) -> Result<(), WeakPassword> {
    let len = password.chars().count();
    if len < MIN_PASSWORD_CHARS {
        return Err(WeakPassword::TooShort {
            min: MIN_PASSWORD_CHARS,
            actual: len,
        });
    }
    let mut chars = password.chars();
    if let Some(first) = chars.next() {
        if chars.all(|c| c == first) {
            return Err(WeakPassword::RepeatedCharacter);
        }
    }
    let lower = password.to_lowercase();
    if COMMON_PASSWORDS.contains(&lower.as_str()) {
        return Err(WeakPassword::Common);
    }
    if user.chars().count() >= 3 && lower.contains(&user.to_lowercase()) {
        return Err(WeakPassword::ContainsUsername);
    }
    if len < LONG_PASSWORD_CHARS {
        let classes = [
            password.chars().any(char::is_lowercase),
            password.chars().any(char::is_uppercase),
            password.chars().any(|c| c.is_ascii_digit()),
            password
                .chars()
                .any(|c| !c.is_lowercase() && !c.is_uppercase() && !c.is_ascii_digit()),
        ];
        let found = classes.iter().filter(|&&b| b).count();
        if found < 3 {
            return Err(WeakPassword::TooFewClasses {
                long: LONG_PASSWORD_CHARS,
                required: 3,
                found,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn strength_rules() {
        use WeakPassword::*;
        assert_eq!(
            check_strength("Sh0rt!", "u"),
            Err(TooShort { min: 12, actual: 6 })
        );
        assert_eq!(check_strength("ääääääääääää", "u"), Err(RepeatedCharacter));
        assert_eq!(
            check_strength("zzzzzzzzzzzzzzzzzzzz", "u"),
            Err(RepeatedCharacter)
        );
        assert_eq!(check_strength("Password1234", "u"), Err(Common));
        assert_eq!(check_strength("xx-Alice-2024-yy", "alice"), Err(ContainsUsername));
        assert_eq!(check_strength("ab-Xy-2024-zzq", "ab"), Ok(()));
        assert!(matches!(
            check_strength("abcdefghijkl", "u"),
            Err(TooFewClasses { found: 1, .. })
        ));
        assert!(matches!(
            check_strength("abcdefgh1234", "u"),
            Err(TooFewClasses { found: 2, .. })
        ));
        assert_eq!(check_strength("abcdefgh123!", "u"), Ok(()));
        assert_eq!(
            check_strength("correct horse battery", "u"),
            Ok(()),
            "long passphrases need no classes"
        );
        assert!(TooShort { min: 12, actual: 3 }.to_string().contains("12"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn strength_never_panics(p in ".{0,40}", u in ".{0,8}") {
            let _ = check_strength(&p, &u);
        }
    }
}
