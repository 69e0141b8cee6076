//! Settings: [`settings::Config`] is loaded once (defaults → TOML file →
//! `LESSON_REPLAY_*` environment) and validated; [`reference`] describes every
//! setting once (the source of `--help` and of `docs/configuration.md`);
//! [`parts`] turns the settings into the typed settings of each lower part;
//! [`apps`] holds what differs per app; [`forms`] how values are read and shown.

pub mod apps;
pub mod forms;
pub mod parts;
pub mod reference;
pub mod settings;
